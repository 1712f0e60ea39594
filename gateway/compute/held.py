"""A database held stopped for an operation (`Database.held` in gateway/compute/lifecycle.py):
the transitions an operation such as a snapshot, a roll-back, an upload, an upgrade or a
delete makes on it, with its lock and lease held."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from storage.cache import Databases, roll_back
from storage.snapshots import Manifest

from . import durability, walrestore
from .states import State


class Owner(Protocol):
    """What Held needs of its database's lifecycle (gateway/compute/lifecycle.py Database)."""
    id: str
    databases: Databases

    def move(self, to: State, why: str) -> None: ...

    async def new_history(self) -> bool: ...

    async def catch_up_held(self) -> bool: ...

    async def replay_to(self, **target) -> bool: ...


class Held:
    """A database held stopped by `Database.held`, with its lock and lease: the transitions an
    operation makes on it."""

    def __init__(self, db: Owner, stopped: bool) -> None:
        self.db = db
        self.stopped = stopped  # whether an instance was stopped for the block

    async def save_now(self, note: str) -> Manifest | None:
        """Save the stopped local copy as a new version if it holds changes (`db snapshot`,
        and before an upgrade); the new manifest, or None if there was nothing to save."""
        saved = await self.db.databases.save(self.db.id, note=note)
        if saved is not None:
            self.db.move(State.LOCAL, f"saved as {saved.version}")
        return saved

    async def restore_local(self) -> None:
        """Make sure the database has a local copy (restored from storage, and the stored WAL
        beyond it replayed: a base backup cannot start without)."""
        restored = await self.db.databases.ensure_local(self.db.id)
        if restored is not None:
            self.db.move(State.LOCAL, f"restored {restored.version}")
            if await self.db.catch_up_held():
                self.db.move(State.CHANGED, "replayed the stored WAL")

    async def roll_back(self, version: str) -> tuple[Manifest | None, Manifest]:
        """Make stored `version` current again and the local copy that version (unsaved local
        changes are saved first): (the version saved before, the target's manifest). With WAL
        in storage beyond that version (durability=async), the copy is first promoted to a new
        timeline and stored as a new version equal to it, so that WAL written after it is
        never replayed onto it (gateway/compute/durability.py)."""
        saved, target = await roll_back(self.db.databases, self.db.id, version, diverge=self.db.new_history)
        self.db.move(State.LOCAL, f"rolled back to {target.version}")
        return saved, target

    async def restore_to(self, versions: list[str], what: str, **target) -> tuple[Manifest | None, Manifest]:
        """Restore to a point (`target_time` or `target_lsn`; `what` says which): a stored
        version saved before it (the first of `versions` whose base the target does not
        precede: an LSN may lie in the run before a version) plus the stored WAL up to it,
        replayed and promoted, stored as a new current version. (The version saved before,
        the base's manifest.)"""
        saved = await self.save_now(f"saved before restoring to {what}")
        for i, version in enumerate(versions):
            try:
                _, base = await roll_back(self.db.databases, self.db.id, version,
                                          diverge=lambda: self.db.replay_to(**target),
                                          note=f"restored to {what} from {version}")
            except walrestore.BeforeBase:
                if i == len(versions) - 1:
                    raise
                continue  # the copy was removed again; the next older version may hold it
            self.db.move(State.LOCAL, f"restored to {what}")
            return saved, base
        raise ValueError("no version to restore from")

    async def replace(self, built: Path, roles, *, expect, note: str) -> str:
        """Store `built` (a database directory beside the data root) as the new current
        version, written only if storage still holds `expect` (the current version the caller
        read), and rename it into place of the local copy. The version it replaces stays in
        storage. Returns the new version."""
        db_id, databases = self.db.id, self.db.databases
        manifest = await databases.store.snapshot(db_id, built / "pgdata", roles, expect=expect, note=note)
        databases.forget(db_id)
        await databases.put_in_place(db_id, built, manifest.version)
        self.db.move(State.LOCAL, f"replaced by {manifest.version}")
        return manifest.version

    async def remove(self, *, everywhere: bool = False) -> None:
        """Delete the local copy (takes its file lock: refused while another process runs it);
        `everywhere`: every object of the database in storage too."""
        db_id, databases = self.db.id, self.db.databases
        if databases.catalog.db_dir(db_id).exists():
            await asyncio.to_thread(databases.catalog.delete, db_id)
        if everywhere:
            await databases.store.delete_database(db_id)
            await asyncio.to_thread(durability.drop_spool, databases.catalog.root, db_id)
        databases.forget(db_id)
        self.db.move(State.ABSENT if everywhere else State.STORED, "deleted" if everywhere
                      else "local copy removed")
