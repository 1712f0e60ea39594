"""The local cache of databases: which copies are on this machine, whether they hold changes
not yet in storage, restoring a copy from storage on first use, saving it when its instance
stops, and which clean copies may be removed to keep a disk budget (the lifecycle removes them).

A local copy that is newer than storage is never removed; saving it is retried."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

from . import roles as roles_mod
from .atomic import fsync_dir, sync_tree, write_atomic
from .errors import NotFound, PreconditionFailed, StorageError, disk_full_as
from .local import LocalCatalog
from .snapshots import Current, Manifest, SnapshotStore

log = logging.getLogger("pgsni.cache")

_SET_ASIDE = re.compile(r"\.conflict-(.+)-\d{8}T\d{6}-[0-9a-f]{4}")


@dataclass
class LocalState:
    version: str | None = None  # the stored version this copy was restored from or saved as
    dirty: bool = True  # holds changes that are not in storage yet
    running: bool = False  # an instance runs (or ran and died) on it
    last_used: float = 0.0  # unix time of the last stop
    # the version whose WAL prefix this copy's WAL goes under (storage/wal.py) when it is not
    # `version`'s own: `version` is a base backup, which continues the prefix of its copy's
    wal: str | None = None
    # a base backup of this running copy about to become current: if a crash comes between the
    # pointer's move and this state's, storage's current version is still this copy's own
    pending_base: str | None = None

    @property
    def wal_prefix(self) -> str | None:
        return self.wal or self.version


class Databases:
    def __init__(self, catalog: LocalCatalog, store: SnapshotStore, *, budget_bytes: int = 0,
                 cache_seconds: float = 2.0) -> None:
        self.catalog = catalog
        self.store = store
        self.budget_bytes = budget_bytes
        self.cache_seconds = cache_seconds
        self._current: dict[str, tuple[float, Current | None]] = {}

    # --- local state ---------------------------------------------------------------------------
    def _state_file(self, db_id: str) -> Path:
        return self.catalog.db_dir(db_id) / "state.json"

    def state(self, db_id: str) -> LocalState:
        try:
            return LocalState(**json.loads(self._state_file(db_id).read_text()))
        except FileNotFoundError:
            return LocalState()

    def save_state(self, db_id: str, state: LocalState) -> None:
        """Durably: after a power loss the state must not go back to an older one (a copy saved
        as version B but read as "dirty, from A" would be set aside as a conflict)."""
        path = self._state_file(db_id)
        write_atomic(path, json.dumps(asdict(state)).encode())
        fsync_dir(path.parent)

    # --- what exists ---------------------------------------------------------------------------
    async def current(self, db_id: str, *, fresh: bool = False) -> Current | None:
        """The stored current version, cached briefly (auth and wake ask in quick succession)."""
        hit = self._current.get(db_id)
        if hit and not fresh and time.monotonic() - hit[0] < self.cache_seconds:
            return hit[1]
        cur = await self.store.current(db_id)
        if cur is None:  # not kept: clients may name any number of ids that exist nowhere
            self._current.pop(db_id, None)
        else:
            self._current[db_id] = (time.monotonic(), cur)
        return cur

    def forget(self, db_id: str) -> None:
        self._current.pop(db_id, None)

    async def stored_keys(self, db_id: str) -> list[str]:
        """Every object storage holds under the database's name (versions, pointer, lease)."""
        return [o.key for o in await self.store.backend.list(f"dbs/{db_id}/")]

    async def exists(self, db_id: str) -> bool:
        return self.catalog.exists(db_id) or await self.current(db_id) is not None

    async def roles(self, db_id: str) -> dict[str, roles_mod.Role] | None:
        """Roles for authenticating while the database is stopped: the local copy's saved
        roles, else those in the stored manifest. None if the database exists nowhere."""
        if self.catalog.exists(db_id):
            return self.catalog.roles(db_id) or {}
        cur = await self.current(db_id)
        return cur.manifest.role_map() if cur else None

    # --- restore -------------------------------------------------------------------------------
    async def ensure_local(self, db_id: str) -> Manifest | None:
        """Restore the current version if there is no local copy. The caller holds the
        database's lock, so concurrent first connects download once."""
        if self.catalog.exists(db_id):
            return None
        cur = await self.current(db_id)
        if cur is None:
            raise NotFound(f'database "{db_id}" does not exist')
        await self.install(db_id, cur.manifest)
        return cur.manifest

    async def catch_up(self, db_id: str) -> Manifest | None:
        """After taking a database's lease: another gateway may have run it since this copy was
        saved. A clean copy older than storage is replaced by the stored version; a copy with
        unsaved changes that storage has moved past is a conflict (kept, never overwritten)."""
        if not self.catalog.exists(db_id):
            return None
        state = self.state(db_id)
        cur = await self.current(db_id, fresh=True)
        if cur is None or self._descends(db_id, state, cur.manifest):
            return None
        if state.dirty:
            kept = self.set_aside(db_id)
            log.error("the local copy of %s had unsaved changes on top of version %s, but storage "
                      "moved on to %s (another gateway took the database over while this one "
                      "was down or cut off): those changes are only in %s now, not in storage; "
                      "the stored version is used (`pgsni db info %s` lists such copies)",
                      db_id, state.version, cur.manifest.version, kept, db_id)
        log.info("local copy of %s is at %s, storage at %s: restoring the newer version",
                 db_id, state.version, cur.manifest.version)
        await self.install(db_id, cur.manifest)
        return cur.manifest

    def _descends(self, db_id: str, state: LocalState, stored: Manifest) -> bool:
        """Whether the local copy descends from `stored` (storage's current version): it is the
        copy's version, or a base backup of the copy whose move to current the copy's state
        missed (a crash just after); that one is recorded now."""
        if stored.version == state.version:
            return True
        if stored.version != state.pending_base:
            return False
        state.version, state.wal, state.pending_base = stored.version, stored.wal_prefix, None
        self.save_state(db_id, state)
        return True

    async def base_made_current(self, db_id: str, manifest: Manifest, expect: Current) -> None:
        """Make `manifest` (a base backup of the running local copy, stored but not current)
        the current version, if storage still holds `expect`, and record that the copy
        descends from it now (its WAL still goes under the same prefix)."""
        state = self.state(db_id)
        state.pending_base = manifest.version  # durable before the pointer moves
        self.save_state(db_id, state)
        await self.store.set_current(db_id, manifest.version, expect)
        self.forget(db_id)
        state = self.state(db_id)
        self._descends(db_id, state, manifest)

    def set_aside(self, db_id: str) -> Path:
        """Move a local copy that conflicts with storage out of the way (never deleted): it
        becomes `<root>/.conflict-<id>-<time>-<4 hex>`, which no database name can collide
        with (`set_aside_copies` lists them)."""
        kept = self.catalog.root / f".conflict-{db_id}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        os.rename(self.catalog.db_dir(db_id), kept)
        self.forget(db_id)
        return kept

    def set_aside_copies(self, db_id: str) -> list[Path]:
        """Copies of `db_id` set aside for the operator, oldest first."""
        found = []
        for path in self.catalog.root.glob(".conflict-*"):
            m = _SET_ASIDE.fullmatch(path.name)
            if m and m.group(1) == db_id:
                found.append(path)
        return sorted(found, key=lambda p: p.name[-20:])

    async def install(self, db_id: str, manifest: Manifest) -> None:
        """Download `manifest`'s version into a fresh local copy and put it in place (see
        put_in_place)."""
        work = self.catalog.root / f".restore-{db_id}-{secrets.token_hex(4)}"
        started = time.monotonic()
        try:
            with disk_full_as(f'restoring database "{db_id}"'):
                self.catalog.run_as.make_dir(work)
                await self.store.restore(manifest, work / "pgdata")
                await asyncio.to_thread(roles_mod.save, work / "roles.json", manifest.role_map())
                await asyncio.to_thread(self.catalog.run_as.chown_tree, work / "pgdata")
                await self.put_in_place(db_id, work, manifest.version, wal=manifest.wal_prefix)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
            raise
        log.info("restored %s version %s in %.0f ms", db_id, manifest.version,
                 (time.monotonic() - started) * 1000)

    async def put_in_place(self, db_id: str, work: Path, version: str, *, wal: str | None = None) -> None:
        """Make `work` (a database directory beside the local copies, holding exactly the
        stored `version`, whose WAL goes under `wal`'s prefix: by default its own) the clean
        local copy of `db_id`, replacing any existing one atomically (the old copy must not
        be running). Everything in `work` is synced before its state says it is clean, and
        the rename is durable before this returns."""

        def seal() -> None:
            # Durable before declared clean: else a power loss could leave empty files in a
            # "clean" copy, and its next save would store them as a new version.
            sync_tree(work)
            # the state goes in before the rename: a copy never shows without it
            state = LocalState(version=version, dirty=False, last_used=time.time(),
                               wal=wal if wal != version else None)
            write_atomic(work / "state.json", json.dumps(asdict(state)).encode())
            fsync_dir(work)

        await asyncio.to_thread(seal)
        # the renames stay on the loop: cheap, and no cancellation can come between them
        target, old = self.catalog.db_dir(db_id), None
        if target.exists():
            old = self.catalog.root / f".trash-{db_id}-{secrets.token_hex(4)}"
            os.rename(target, old)
        os.rename(work, target)
        try:
            await asyncio.to_thread(fsync_dir, self.catalog.root)  # makes both renames durable
        finally:
            if old is not None:
                await asyncio.to_thread(shutil.rmtree, old, ignore_errors=True)

    # --- instance lifecycle hooks -------------------------------------------------------------
    def mark_running(self, db_id: str) -> None:
        state = self.state(db_id)
        if state.running:  # the end of the last run was never recorded (a full disk, say)
            state.dirty = True
        state.running = True
        self.save_state(db_id, state)

    def mark_stopped(self, db_id: str, *, changed: bool) -> LocalState:
        state = self.state(db_id)
        state.running = False
        state.dirty = state.dirty or changed
        state.last_used = time.time()
        self.save_state(db_id, state)
        return state

    async def save(self, db_id: str, note: str = "") -> Manifest | None:
        """Snapshot a stopped local copy if it holds unsaved changes. Refuses to overwrite a
        stored version this copy does not descend from (another writer got there first)."""
        if not self.catalog.exists(db_id):
            return None  # no local copy: storage already holds everything there is
        state = self.state(db_id)
        if state.running:
            raise StorageError(f"database {db_id} is running; stop it before saving")
        if not state.dirty:
            return None
        cur = await self.current(db_id, fresh=True)
        if cur is not None and not self._descends(db_id, state, cur.manifest):
            raise PreconditionFailed(
                f"storage holds version {cur.manifest.version} of {db_id}, but the local copy "
                f"descends from {state.version}; not overwriting (another gateway wrote it?)")
        manifest = await self.store.snapshot(db_id, self.catalog.pgdata(db_id),
                                             self.catalog.roles(db_id) or {}, expect=cur, note=note)
        self.saved_as(db_id, manifest)
        return manifest

    def saved_as(self, db_id: str, manifest: Manifest) -> None:
        """Record that the local copy is now stored as `manifest`'s version, unchanged since."""
        self.forget(db_id)
        state = self.state(db_id)
        state.version, state.dirty, state.wal, state.pending_base = manifest.version, False, None, None
        self.save_state(db_id, state)

    def recover(self) -> list[str]:
        """At gateway start: copies still marked running belong to a gateway that died. Their
        instance was not stopped cleanly, so they may hold unsaved changes."""
        recovered = []
        for db_id in self.catalog.list():
            if self.state(db_id).running:
                self.mark_stopped(db_id, changed=True)
                recovered.append(db_id)
        if recovered:
            log.warning("recovered %d database(s) left running by an earlier gateway: %s",
                        len(recovered), ", ".join(recovered))
        return recovered

    def dirty_stopped(self) -> list[str]:
        return [i for i in self.catalog.list() if (s := self.state(i)).dirty and not s.running]

    # --- cache budget ---------------------------------------------------------------------------
    def evictable(self, running: set[str]) -> list[tuple[float, str, int]]:
        """(last_used, id, bytes) of local copies that are clean and stopped, oldest first.
        Walks every such copy: call it in a thread."""
        out = []
        for db_id in self.catalog.list():
            state = self.state(db_id)
            if db_id in running or state.running or state.dirty or state.version is None:
                continue
            out.append((state.last_used, db_id, disk_usage(self.catalog.db_dir(db_id))))
        return sorted(out)


def disk_usage(path: Path) -> int:
    """Bytes in the files under `path` (files that vanish meanwhile count as empty)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


async def roll_back(databases: Databases, db_id: str, version: str, *,
                    diverge: Callable[[], Awaitable[bool]] | None = None,
                    note: str = "") -> tuple[Manifest | None, Manifest]:
    """Make `version` current again. Unsaved local changes are first saved as a new version,
    so the roll-back itself can be undone. The database must be stopped (caller holds its lock).
    `diverge()`, called once the local copy is `version`, may change the copy so that it starts
    a history of its own (a new WAL timeline, or WAL replayed up to a point in time) and say
    so: the copy is then stored as a new version (`note`) and made current instead. If it
    fails, the local copy is removed (the current version stays as it was)."""
    saved = await databases.save(db_id, note=f"saved before restoring {version}")
    cur = await databases.current(db_id, fresh=True)
    if cur is None:
        raise NotFound(f'database "{db_id}" is not in storage')
    target = await databases.store.manifest(db_id, version)  # NotFound for an unknown version
    await databases.install(db_id, target)
    try:
        diverged = diverge is not None and await diverge()
    except BaseException:
        # the copy may be half-replayed: nothing of it may start; the current version is intact
        await asyncio.to_thread(databases.catalog.delete, db_id)
        databases.forget(db_id)
        raise
    if diverged:
        stored = await databases.store.snapshot(db_id, databases.catalog.pgdata(db_id),
                                                databases.catalog.roles(db_id) or {}, expect=cur,
                                                note=note or f"restored {version} (on a new timeline)")
        await asyncio.to_thread(databases.saved_as, db_id, stored)
    else:
        await databases.store.set_current(db_id, version, cur)
        databases.forget(db_id)
    return saved, target
