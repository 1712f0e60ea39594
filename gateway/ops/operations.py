"""Database lifecycle operations, shared by the CLI (offline, `gateway/cli/main.py`) and a running
gateway's admin API: build `Ops(settings, catalog, databases, manager)` from the live objects.

Every method is async, returns a JSON-able dataclass from `gateway/ops/results.py` (`to_dict()`)
and raises `OperationError(kind, message, hint=)` with kind invalid / not_found / conflict /
busy / unavailable / failed (`.status` is the HTTP status). With `dry_run=True` a mutating
method checks everything it can, changes nothing and returns a `Plan` (action, id, changes).

    create(id, password=None, source=None, sha256=None, init_files=(), owner=None) -> Created
    list() -> list[Summary]
    info(id) -> Info
    delete(id, force=False) -> Deleted
    fork(src, new, version=None, time=None, lsn=None) -> Forked
    snapshot(id, force=False, stop=False) -> Snapshot
    versions(id) -> list[Version]
    exists(id) -> bool
    restore(id, version=None, time=None, lsn=None, force=False) -> Restored
    verify(id) -> Verified
    set_password(id, role="postgres", password=None) -> PasswordSet
    secure(id, drop_untrusted=False) -> Secured
    upgrade(id, to) -> UpgradedResult

A database running in this process (the gateway's manager) is stopped through the manager
first by delete, restore and snapshot (saving its changes, except for delete); with clients
connected they refuse with `busy` unless `force=True`. A snapshot of one that ships its WAL
(durability=async) is an online base backup instead, unless `stop=True`: it keeps running. A database another process runs (a
gateway, when called from the CLI) is refused with `busy` (its lock).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import contextlib
import logging
import re
from typing import Sequence

from gateway.compute import dbroles, durability, pitr, securing, walrestore
from gateway.compute.instances import InstanceManager
from gateway.compute.pgbins import PgNotInstalled
from gateway.config import Settings
from gateway.errors import CANNOT_CONNECT_NOW, TOO_MANY_CONNECTIONS, UNKNOWN_DATABASE, GatewayError
from storage import errors as storage_errors
from storage import snapshots
from storage.cache import Databases, disk_usage
from storage.ids import ID_RULE, valid_id
from storage.leases import LeaseHeld
from storage.local import DatabaseBusy, DatabaseExists, LocalCatalog
from storage.wal import format_lsn, parse_lsn

from . import steps
from .create_from import create_from
from .results import (
    Created, Deleted, Forked, Info, OperationError, PasswordSet, Plan, Restored, Secured, Snapshot,
    Summary, UpgradedResult, Verified, Version)
from .upgrade import UpgradeError, upgrade

log = logging.getLogger("pgsni.operations")

__all__ = ["Ops", "OperationError"]


@contextlib.contextmanager
def translated():
    """Turn gateway and storage errors into OperationError."""
    try:
        yield
    except OperationError:
        raise
    except DatabaseBusy as e:
        raise OperationError("busy", str(e), hint="A running gateway has it open: use its admin "
                             "API, or stop it first.") from e
    except DatabaseExists as e:
        raise OperationError("conflict", str(e)) from e
    except LeaseHeld as e:
        raise OperationError("busy", str(e), hint="Run the operation on that gateway, or wait "
                             "until it has stopped the database.") from e
    except storage_errors.NotFound as e:
        raise OperationError("not_found", str(e)) from e
    except walrestore.OutOfReach as e:
        raise OperationError("invalid", str(e), hint="`pgsni db info` shows the WAL in storage of a "
                             "running database; `pgsni db versions` the versions kept.") from e
    except storage_errors.PreconditionFailed as e:
        raise OperationError("conflict", str(e)) from e
    except storage_errors.StorageUnavailable as e:
        raise OperationError("unavailable", str(e), hint="Try again when storage is back.") from e
    except storage_errors.StorageError as e:
        raise OperationError("failed", str(e)) from e
    except GatewayError as e:
        kind = {UNKNOWN_DATABASE: "not_found", TOO_MANY_CONNECTIONS: "busy"}.get(e.code, "failed")
        if e.code == CANNOT_CONNECT_NOW:  # another process has it, storage is down, or it broke
            kind = "busy" if "in use" in e.message else \
                "unavailable" if "unavailable" in e.message else "failed"
        raise OperationError(kind, e.message + (f": {e.detail}" if e.detail else ""), hint=e.hint) from e


_LSN = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


def check_lsn(text: str | None) -> int | None:
    """A WAL location as Postgres writes it (`0/16B3748`), or None."""
    if text is None:
        return None
    if not _LSN.fullmatch(text):
        raise OperationError("invalid", f"{text!r} is not an LSN: two hexadecimal numbers of up to 8 "
                             "digits with a slash between, as pg_current_wal_lsn() shows (0/16B3748)")
    return parse_lsn(text)


def point_target(time: dt.datetime | None, lsn: int | None) -> tuple[str, dict]:
    """How a restore or fork to a point names its target: (words for notes, keyword arguments)."""
    if lsn is not None:
        return f"LSN {format_lsn(lsn)}", {"target_lsn": lsn}
    return time.isoformat(), {"target_time": time}


def one_target(version, time: dt.datetime | None, lsn, *, required: bool) -> None:
    given = sum(x is not None for x in (version, time, lsn))
    if given > 1 or (required and not given):
        raise OperationError("invalid", "give " + ("one" if required else "at most one") +
                             " of a version, a time or an LSN")
    if time is not None and time.tzinfo is None:
        raise OperationError("invalid", "the time needs a time zone (e.g. 2026-12-03T12:00:00Z)")


def check_id(db_id: str) -> str:
    if not valid_id(db_id):
        raise OperationError("invalid", f"invalid database id {db_id!r}: a database id is {ID_RULE}")
    return db_id


class Ops:
    def __init__(self, settings: Settings, catalog: LocalCatalog, databases: Databases,
                 manager: InstanceManager) -> None:
        self.settings = settings
        self.catalog = catalog
        self.databases = databases
        self.store = databases.store
        self.manager = manager

    async def exists(self, db_id: str) -> bool:
        """Whether `db_id` has a local copy or a stored version."""
        check_id(db_id)
        return await self._exists(db_id)

    # --- helpers -------------------------------------------------------------------------------
    async def _exists(self, db_id: str) -> bool:
        with translated():
            return self.catalog.exists(db_id) or await self.databases.current(db_id, fresh=True) is not None

    async def _require(self, db_id: str) -> None:
        check_id(db_id)
        if not await self._exists(db_id):
            route = self.settings.remote_routes.get(db_id)
            if route is not None:  # nothing here to show, fork, dump or delete
                raise OperationError("not_found", f'"{db_id}" is routed to the remote server '
                                     f'{route.address} (remote_routes); pgsni keeps no copy of it')
            raise OperationError("not_found", f'database "{db_id}" does not exist')

    def _clients(self, db_id: str) -> int:
        inst = self.manager.instances.get(db_id)
        return inst.clients if inst is not None and inst.alive else 0

    def _check_idle(self, db_id: str, force: bool, what: str) -> None:
        n = self._clients(db_id)
        if n and not force:
            raise OperationError("busy", f'database "{db_id}" has {n} client(s) connected',
                                 hint=f"{what} would disconnect them; pass force to do it anyway.")

    @contextlib.asynccontextmanager
    async def _held(self, db_id: str, reason: str, *, save: bool = True, flock: bool = True):
        """The database stopped (here, through the manager) and locked against other
        processes for the block; yields its lifecycle's `Held` (the transitions allowed)."""
        with translated():
            async with self.manager.stopped(db_id, reason, save=save) as held:
                lock = self.catalog.lock(db_id) if flock and self.catalog.exists(db_id) \
                    else contextlib.nullcontext()
                with lock:
                    yield held

    # --- create --------------------------------------------------------------------------------
    async def create(self, db_id: str, password: str | None = None, source: str | None = None,
                     sha256: str | None = None, init_files: Sequence[str] = (),
                     owner: str | None = None, *, major: str | None = None,
                     dry_run: bool = False) -> Created | Plan:
        check_id(db_id)
        steps.check_owner(owner)
        major = self._check_major(major, source)
        files = steps.parse_init_files(init_files)  # syntax errors before anything happens
        if db_id in self.settings.remote_routes:
            raise OperationError("conflict", f'"{db_id}" is routed to a remote server (remote_routes): '
                                 "a local database of that name would never be reached")
        if await self._exists(db_id):
            raise OperationError("conflict", f'database "{db_id}" already exists')
        if dry_run:
            changes = [f"create database {db_id} " + (f"from {source}" if source else
                                                     f"from the template of Postgres {major}"),
                       "set a new password for role postgres"]
            if owner:
                changes.append(f"create login role {owner} owning database postgres and schema public")
            changes += [f"run {f.path} ({len(f.statements)} statements)" for f in files]
            changes.append("save the first version to storage")
            return Plan("create", db_id, changes)
        password = password or steps.new_password()
        owner_password = steps.new_password() if owner else None
        with translated():
            if source is None:
                await self.manager.create(db_id, password, major=major)
            else:
                await create_from(self.manager, db_id, password, source, sha256)
            try:
                inst = self.manager.instances[db_id]
                count = await steps.initialise(inst, owner, owner_password, files)
                await steps.refresh_roles(self.manager, db_id)
            except BaseException:
                # a database whose init failed is not left behind, here or in storage
                async with self.manager.stopped(db_id, "init failed", save=False) as held:
                    # with no version stored, its other objects (e.g. its lease) go too
                    await held.remove(everywhere=await self.databases.current(db_id, fresh=True) is None)
                raise
            await self.manager.stop(db_id, "created")
        version = self.databases.state(db_id).version
        return Created(db_id, "postgres", password, owner, owner_password, source,
                       [f.path for f in files], count, version,
                       steps.local_pg_major(self.catalog, db_id))

    def _check_major(self, major: str | None, source: str | None) -> str | None:
        """The major a new database gets (None: an archive's own), refused if not installed."""
        if source is not None:
            if major is not None:
                raise OperationError("invalid", "--pg does not go with --from: an archive keeps its "
                                     "own major (pgsni db upgrade moves it to another)")
            return None
        installs = self.manager.installs
        try:
            return installs.get(major).major if major else installs.default_major
        except PgNotInstalled as e:
            raise OperationError("invalid", str(e)) from None

    # --- reading -------------------------------------------------------------------------------
    async def list(self) -> list[Summary]:
        with translated():
            local = set(self.catalog.list())
            stored = set(await self.store.list_databases())
        rows = []
        for db_id in sorted(local | stored):
            state = self.databases.state(db_id) if db_id in local else None
            rows.append(Summary(db_id, db_id in local, db_id in stored, self._running(db_id),
                                state.version if state else None, bool(state and state.dirty)))
        # ids routed to an external server: no copy here or in storage (create refuses them)
        rows += [Summary(db_id, False, False, False, None, False, remote=route.address)
                 for db_id, route in sorted(self.settings.remote_routes.items())]
        return sorted(rows, key=lambda r: r.id)

    def _running(self, db_id: str) -> bool:
        inst = self.manager.instances.get(db_id)
        if inst is not None:
            return inst.alive
        if not self.catalog.exists(db_id) or not self.databases.state(db_id).running:
            return False
        return steps.locked_elsewhere(self.catalog, db_id)

    async def info(self, db_id: str) -> Info:
        await self._require(db_id)
        with translated():
            cur = await self.databases.current(db_id, fresh=True)
            versions = await self.versions(db_id) if cur is not None else []
        local = self.catalog.exists(db_id)
        state = self.databases.state(db_id) if local else None
        running = self._running(db_id)
        inst = self.manager.instances.get(db_id)
        if inst is not None and inst.alive:
            connections, last_used = inst.clients, steps.iso_now()
        else:
            connections = await steps.count_connections(self.settings, db_id) if running else 0
            last_used = steps.iso(state.last_used) if state and state.last_used else None
            if running:
                last_used = steps.iso_now()
        manifest = cur.manifest if cur else None
        set_aside = self.databases.set_aside_copies(db_id)
        size = await asyncio.to_thread(disk_usage, self.catalog.db_dir(db_id)) if local else 0
        return Info(db_id, local, cur is not None, running, connections, size,
                    manifest.archive["size"] if manifest else 0,
                    manifest.version if manifest else None, state.version if state else None,
                    bool(state and state.dirty), last_used,
                    manifest.pg_major if manifest else steps.local_pg_major(self.catalog, db_id),
                    versions, [str(p) for p in set_aside],
                    (await self.manager.database(db_id).state(stored=cur is not None,
                                                              set_aside=set_aside)).value,
                    wal := (await durability.shipping(inst) if inst is not None and inst.alive else None),
                    restorable_range(versions, manifest.version if manifest else None, wal))

    async def versions(self, db_id: str) -> list[Version]:
        check_id(db_id)
        with translated():
            infos = await self.store.versions(db_id)
        return [Version(i.version, i.size, i.current) for i in infos]

    # --- delete --------------------------------------------------------------------------------
    async def delete(self, db_id: str, *, force: bool = False, dry_run: bool = False) -> Deleted | Plan:
        await self._require(db_id)
        self._check_idle(db_id, force, "deleting it")
        with translated():
            objects = await self.store.backend.list(f"dbs/{db_id}/")
        local = self.catalog.db_dir(db_id).exists()
        if dry_run:
            changes = ["stop its running instance (discarding unsaved changes)"] if self._running(db_id) else []
            if local:
                changes.append(f"remove the local copy {self.catalog.db_dir(db_id)}")
            changes.append(f"remove {len(objects)} object(s) under dbs/{db_id}/ from {self.store.backend.describe()}")
            return Plan("delete", db_id, changes)
        async with self._held(db_id, "deleted", save=False, flock=False) as held:
            await held.remove(everywhere=True)
        return Deleted(db_id, local, len(objects), held.stopped)

    # --- fork ----------------------------------------------------------------------------------
    async def fork(self, src: str, new: str, version: str | None = None, *,
                   time: dt.datetime | None = None, lsn: str | None = None,
                   dry_run: bool = False) -> Forked | Plan:
        """A new database from a stored `version` of `src` (default: its current one), or from
        `src` at a past `time` or `lsn`: the version saved before it plus the stored WAL
        replayed up to it (`src` is only read then, and may keep running)."""
        target_lsn = check_lsn(lsn)
        one_target(version, time, lsn, required=False)
        await self._require(src)
        check_id(new)
        if await self._exists(new):
            raise OperationError("conflict", f'database "{new}" already exists')
        if time is not None or target_lsn is not None:
            return await self._fork_at(src, new, time, target_lsn, dry_run)
        saved = None
        unsaved = version is None and self._unsaved(src)
        with translated():
            if unsaved and not dry_run:
                # fork what SRC holds now: its unsaved changes become a version first
                try:
                    saved = (await self.snapshot(src)).version
                except OperationError as e:
                    if e.kind != "busy":
                        raise
                    raise OperationError("busy", f"{e.message}; its unsaved changes cannot be "
                                         "saved for the fork now", hint="Give a version to fork "
                                         "a stored one, or try again when it is idle.") from e
            if version is None:
                cur = await self.databases.current(src, fresh=True)
                if cur is None:
                    raise OperationError("not_found", f'database "{src}" has no stored version to fork',
                                         hint=f"Run `pgsni db snapshot {src}` first.")
                manifest = cur.manifest
            else:
                manifest = await self.store.manifest(src, version)
            if dry_run:
                changes = [f"save the unsaved changes of {src} as a new version first"] if unsaved else []
                changes += [f"copy {manifest.archive['key']} ({manifest.archive['size']} bytes) "
                            f"inside {self.store.backend.describe()}",
                            f"make it the first version of {new} (same roles and passwords as {src})"]
                return Plan("fork", new, changes)
            forked = await self.manager.fork(new, manifest)
        return Forked(new, src, manifest.version, forked.version, manifest.archive["size"], saved)

    async def _fork_at(self, src: str, new: str, time: dt.datetime | None, lsn: int | None,
                       dry_run: bool) -> Forked | Plan:
        what, target = point_target(time, lsn)
        with translated():
            # SRC is not stopped: what storage holds of it now is what the fork gets
            bases = await self._bases(src, time, lsn, growing=False)
            if dry_run:
                return Plan("fork", new, [
                    f"download version {bases[0].version} of {src} and replay its stored WAL up "
                    f"to {what} (nothing of {src} changes)",
                    f"store the result as the first version of {new} (roles and passwords of that "
                    "version)"])
            base, forked = await self.manager.fork_at(new, bases, what, **target)
        return Forked(new, src, base.version, forked.version, forked.archive["size"],
                      time=time.isoformat() if time else None, lsn=format_lsn(lsn) if lsn is not None else None)

    def _unsaved(self, db_id: str) -> bool:
        if self.manager.instances.get(db_id) is not None:
            return True  # running here: may have changes; stopping tells
        return self.catalog.exists(db_id) and self.databases.state(db_id).dirty

    # --- snapshot and restore ------------------------------------------------------------------
    async def snapshot(self, db_id: str, *, force: bool = False, stop: bool = False,
                       dry_run: bool = False) -> Snapshot | Plan:
        """Save the local copy as a new version if it changed; a database running here that
        ships its WAL gets an online base backup instead (it keeps running), unless `stop`."""
        check_id(db_id)
        if not self.catalog.exists(db_id):
            if not await self._exists(db_id):
                raise OperationError("not_found", f'database "{db_id}" does not exist')
            raise OperationError("not_found", f'database "{db_id}" has no local copy here',
                                 hint="Storage already holds everything there is.")
        inst = self.manager.instances.get(db_id)
        if not stop and inst is not None and inst.alive and inst.shipper is not None:
            if dry_run:
                return Plan("snapshot", db_id, ["take an online base backup of the running instance "
                                                "(it keeps serving) and make it the current version"])
            with translated():
                manifest = await self.manager.base_backup(db_id, "pgsni db snapshot")
            if manifest is not None:
                return Snapshot(db_id, manifest.version, True, False, base_backup=True)
            # it stopped meanwhile: its stopped copy is saved as usual
        self._check_idle(db_id, force, "snapshotting stops the instance, which")
        if dry_run:
            running = self._running(db_id)
            dirty = self.databases.state(db_id).dirty
            changes = (["stop the running instance"] if running else []) + \
                (["save the local copy as a new version"] if dirty or running else [])
            return Plan("snapshot", db_id, changes or ["nothing: no changes since the stored version"])
        before = self.databases.state(db_id).version  # before the stop, which may save it
        async with self._held(db_id, "snapshot") as held:
            manifest = await held.save_now(note="pgsni db snapshot")
            after = self.databases.state(db_id).version
        if manifest is not None:
            return Snapshot(db_id, manifest.version, True, held.stopped)
        # the manager's stop may already have saved it
        return Snapshot(db_id, after if after != before else None, after != before, held.stopped)

    async def restore(self, db_id: str, version: str | None = None, *, time: dt.datetime | None = None,
                      lsn: str | None = None, force: bool = False, dry_run: bool = False) -> Restored | Plan:
        """Roll back to a stored `version`, or restore to a point: a `time` (the transactions
        committed before it) or an `lsn` (the WAL up to and including the record at it), from
        the newest version saved before it plus the stored WAL."""
        target_lsn = check_lsn(lsn)
        one_target(version, time, lsn, required=True)
        await self._require(db_id)
        self._check_idle(db_id, force, "restoring it")
        with translated():  # an unknown version is refused before anything stops or saves
            bases = [await self.store.manifest(db_id, version)] if version is not None else \
                await self._bases(db_id, time, target_lsn, growing=self._running(db_id))
        target = bases[0]
        if dry_run:
            changes = (["stop the running instance"] if self._running(db_id) else []) + \
                (["save unsaved local changes as a new version"] if self._unsaved(db_id) else []) + \
                [f"replace the local copy with version {target.version}"]
            changes += ([f"replay the stored WAL up to {point_target(time, target_lsn)[0]} and store "
                         "the result as a new current version"] if version is None else
                        [f"make {target.version} the current version"])
            return Plan("restore", db_id, changes)
        async with self._held(db_id, f"restoring {target.version}") as held:
            if version is not None:
                saved, target = await held.roll_back(target.version)
            else:
                what, point = point_target(time, target_lsn)
                saved, target = await held.restore_to([b.version for b in bases], what, **point)
            now = self.databases.state(db_id).version
        return Restored(db_id, now or target.version, saved.version if saved else None, held.stopped,
                        base=target.version, time=time.isoformat() if time else None,
                        lsn=format_lsn(target_lsn) if target_lsn is not None else None)

    async def _bases(self, db_id: str, time: dt.datetime | None, lsn: int | None, *, growing: bool):
        """The stored versions a restore to a point replays from, in the order to try them:
        the newest saved before `time`, or those an `lsn` may lie after (pitr.bases_for_lsn;
        `growing`: the database runs here and its stop ships the rest of its WAL)."""
        if lsn is not None:
            return await pitr.bases_for_lsn(self.store, db_id, lsn, growing=growing)
        for info in sorted(await self.store.versions(db_id), key=lambda i: i.version, reverse=True):
            manifest = await self.store.manifest(db_id, info.version)
            if dt.datetime.fromisoformat(manifest.created) < time:
                return [manifest]
        raise OperationError("not_found", f'database "{db_id}" has no version saved before '
                             f"{time.isoformat()}", hint="Retention keeps retention_keep versions "
                             "(and those younger than retention_days).")

    # --- verify and passwords ------------------------------------------------------------------
    async def verify(self, db_id: str, *, dry_run: bool = False) -> Verified | Plan:
        await self._require(db_id)
        if dry_run:
            return Plan("verify", db_id, ["nothing (verify only reads): download and check the "
                                          "current version, start the database, run SELECT 1"])
        return await steps.verify(self.manager, db_id)

    async def set_password(self, db_id: str, role: str = "postgres", password: str | None = None,
                           *, dry_run: bool = False) -> PasswordSet | Plan:
        await self._require(db_id)
        if role in dbroles.RESERVED:
            raise OperationError("invalid", f'role "{role}" is the gateway\'s own and has no password')
        with translated():
            roles = await self.manager.roles(db_id) or {}
        if role not in roles:
            raise OperationError("not_found", f'database "{db_id}" has no role "{role}"')
        if dry_run:
            return Plan("password", db_id, [f"set a new password for role {role}",
                                            "save the new version (roles) to storage"])
        password = password or steps.new_password()
        with translated():
            await steps.set_password(self.manager, db_id, role, password)
        return PasswordSet(db_id, role, password)

    # --- roles of databases saved by older versions -----------------------------------------
    async def secure(self, db_id: str, *, drop_untrusted: bool = False,
                     dry_run: bool = False) -> Secured | Plan:
        """Bring a database whose clients logged in as the superuser `postgres` (made by an
        older pgsni) to today's roles (gateway/compute/securing.py), as a new stored version."""
        await self._require(db_id)
        if dry_run:
            return Plan("secure", db_id, [
                "save unsaved local changes as a new version first",
                f"rename the bootstrap superuser to {dbroles.ADMIN} (no password, only the gateway "
                "logs in as it) and make role postgres a role without SUPERUSER that keeps its "
                "password and owns what the superuser owned",
                "remove SUPERUSER from every other role and the server-file and program roles from everyone",
                "refuse if it holds routines in untrusted languages or file_fdw tables"
                + (" (dropped: --drop-untrusted)" if drop_untrusted else ""),
                "store the result as a new version (the one before stays in storage)"])
        with translated():
            try:
                report = await self.manager.secure(db_id, drop_untrusted=drop_untrusted)
            except securing.SecureError as e:
                raise OperationError("failed", f'database "{db_id}" was not changed: {e}') from None
        if report is None:
            return Secured(db_id, False, self.databases.state(db_id).version
                           if self.catalog.exists(db_id) else None)
        return Secured(db_id, True, self.databases.state(db_id).version, report.renamed,
                       report.demoted, report.revoked, report.transferred, report.dropped,
                       report.disabled, report.settings_reset, report.left)

    # --- major versions ----------------------------------------------------------------------
    async def upgrade(self, db_id: str, to: str, *, force: bool = False,
                      dry_run: bool = False) -> UpgradedResult | Plan:
        """Move a database to a newer Postgres major with pg_upgrade (gateway/ops/upgrade.py)."""
        await self._require(db_id)
        self._check_idle(db_id, force, "upgrading stops the instance, which")
        try:
            self.manager.installs.get(to)
        except PgNotInstalled as e:
            raise OperationError("invalid", str(e)) from None
        if dry_run:
            return Plan("upgrade", db_id, [
                "stop it and save unsaved changes as a new version",
                f"pg_upgrade a copy to Postgres {to} beside the data root (the local copy is not touched)",
                "store the upgraded copy as a new version and put it in place (the version before stays)"])
        with translated():
            try:
                done = await upgrade(self.manager, db_id, to)
            except UpgradeError as e:
                raise OperationError("failed", f'database "{db_id}" was not changed: {e}') from None
        return UpgradedResult(done.id, done.from_major, done.to_major, done.version, done.previous_version)


def restorable_range(versions: list[Version], current: str | None, wal: dict | None) -> dict | None:
    """What `db restore --time` can reach (Info.restorable), from the kept versions' names and
    the WAL shipping of a database running here."""
    times = [t for t in (snapshots.version_time(v.version) for v in versions) if t is not None]
    if not times:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    if wal is not None:
        to, rpo = now - dt.timedelta(seconds=wal["lag_seconds"]), wal["lag_seconds"]
        if wal.get("lost_after"):  # WAL lost to shipping, no base backup after it yet
            to = min(to, dt.datetime.fromisoformat(wal["lost_after"]))
            rpo = round((now - to).total_seconds(), 3)
    else:
        to, rpo = snapshots.version_time(current or "") or max(times), None
    return {"from": min(times).isoformat(), "to": to.isoformat(), "rpo_seconds": rpo}
