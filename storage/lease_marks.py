"""The leases that may name this gateway, noted on its own disk (storage/leases.py `marks`):
one empty file per database in `<data_root>/.leases/`, made (and synced) before a claim's
write is sent, removed once the lease is given up or names another gateway. A gateway that
crashed between a claim and its release finds them at its next start, and gives those leases
up (or saves the copy first): otherwise its heartbeat, renewed for its other databases, would
keep them for ever. A mark left behind costs one more release at the next start."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from .atomic import fsync_dir
from .errors import StorageError
from .ids import valid_id


class LeaseMarks:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, db_id: str) -> Path:
        if not valid_id(db_id):  # never build a path from an unchecked id
            raise StorageError(f"invalid database id {db_id!r}")
        return self.dir / db_id

    async def add(self, db_id: str) -> None:
        path = self._path(db_id)
        if not path.exists():
            await asyncio.to_thread(self._make, path)

    def _make(self, path: Path) -> None:
        made = not self.dir.is_dir()
        self.dir.mkdir(mode=0o700, exist_ok=True)
        if made:
            fsync_dir(self.dir.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        fsync_dir(self.dir)  # on disk before the lease is: a power loss must not forget it

    async def discard(self, db_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(db_id).unlink()

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.dir.iterdir() if valid_id(p.name))
        except FileNotFoundError:
            return []
