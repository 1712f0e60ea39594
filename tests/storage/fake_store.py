"""An in-memory object store with its own clock, and per-gateway connections to it that a
test can fail, hang, partition and heal. For lease tests (tests/storage/test_leases.py),
where what matters is who sees which object when, not how bytes reach a disk."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import AsyncIterator, Callable

from storage.backend import Backend, ObjectInfo
from storage.errors import NotFound, PreconditionFailed, StorageUnavailable


class Store:
    """The bucket: key -> (data, etag, modified). `clock` is the store's own clock, which
    stamps `modified` (it may disagree with the gateways' clocks)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.objects: dict[str, tuple[bytes, str, float]] = {}

    def info(self, key: str) -> ObjectInfo:
        data, etag, modified = self.objects[key]
        return ObjectInfo(key, len(data), etag, modified)


class FakeBackend(Backend):
    """One gateway's connection to a `Store`. `partition()` cuts it off: requests fail at once
    (StorageUnavailable), or with `hang=True` wait until `heal()` and only then run. Other
    connections to the same store keep working."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False
        self._healed = asyncio.Event()
        self._healed.set()

    def partition(self, *, hang: bool = False) -> None:
        if hang:
            self._healed.clear()
        else:
            self.down = True

    def heal(self) -> None:
        self.down = False
        self._healed.set()

    async def _reach(self) -> None:
        await self._healed.wait()
        if self.down:
            raise StorageUnavailable("storage is unavailable: partitioned (test)")

    async def get(self, key: str) -> tuple[bytes, str]:
        await self._reach()
        if key not in self.store.objects:
            raise NotFound(f"{key} not found")
        data, etag, _ = self.store.objects[key]
        return data, etag

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        await self._reach()
        current = self.store.objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"{key} exists")
        if if_match is not None and (current is None or current[1] != if_match):
            raise PreconditionFailed(f"{key} changed")
        etag = hashlib.md5(data).hexdigest()
        self.store.objects[key] = (bytes(data), etag, self.store.clock())
        return etag

    async def upload_file(self, key: str, path: Path, *, progress=None) -> ObjectInfo:
        await self.put(key, Path(path).read_bytes())
        return self.store.info(key)

    async def download(self, key: str) -> AsyncIterator[bytes]:
        yield (await self.get(key))[0]

    async def head(self, key: str) -> ObjectInfo | None:
        await self._reach()
        return self.store.info(key) if key in self.store.objects else None

    async def list(self, prefix: str) -> list[ObjectInfo]:
        await self._reach()
        return [self.store.info(k) for k in sorted(self.store.objects) if k.startswith(prefix)]

    async def delete(self, keys: list[str]) -> None:
        await self._reach()
        for key in keys:
            self.store.objects.pop(key, None)
