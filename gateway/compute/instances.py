"""Running Postgres instances, one per database: `acquire(id)` makes sure one is running
(exactly one, however many clients arrive at once), counts its clients, stops it when idle,
evicts the least recently used idle one when the cap is reached, and notices crashes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import psycopg

from gateway import errors
from gateway.config import SUPERUSER_RESERVE, Settings
from gateway.metrics import Metrics
from gateway.rates import TokenBucket
from gateway.wire.scram import scram_verifier
from storage import errors as storage_errors
from storage import roles as roles_mod
from storage.cache import Databases, roll_back
from storage.errors import StorageError
from storage.instance_uids import InstanceUids
from storage.leases import LeaseHeld, Leases
from storage.osuser import OSUserError

from . import dbroles, extensions, pgbins, pgcontrol, securing
from .cgroups import Cgroups, Limits
from .pgbins import PgNotInstalled
from .postgres import PostgresError, PostgresProcess, stop_orphan
from .role_reader import RoleReader

log = logging.getLogger("pgsni.instances")

Placer = Callable[[str], Awaitable[None]]  # makes <data_root>/<id>/pgdata for a new database


@dataclass(eq=False)
class Instance:
    db_id: str
    process: PostgresProcess
    lock: object
    clients: int = 0
    last_used: float = field(default_factory=time.monotonic)
    roles: dict[str, roles_mod.Role] | None = None  # as last read
    reader: RoleReader | None = None  # fresh roles for every login (gateway/compute/role_reader.py)
    control: pgcontrol.Control | None = None  # pg_control before it started: nothing written since = nothing to save
    watcher: asyncio.Task | None = None
    started_at: float = field(default_factory=time.monotonic)  # when it became ready

    @property
    def socket_dir(self) -> Path:
        return self.process.socket_dir

    @property
    def socket_path(self) -> Path:
        return self.process.socket_path

    @property
    def alive(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.returncode is None and not self.process.stopping


class InstanceManager:
    def __init__(self, settings: Settings, databases: Databases) -> None:
        self.settings = settings
        self.databases = databases
        self.catalog = databases.catalog
        self.installs = pgbins.for_settings(settings)  # each database runs with its own major's
        self.instances: dict[str, Instance] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Lock()  # serialises decisions about the instance cap
        self._starting: set[str] = set()  # slots under the cap reserved by starts in progress
        self._creating: dict[str, asyncio.Event] = {}  # creations in progress: logins wait for them
        self.starts = 0  # how many postmasters this manager has started (tests, metrics)
        self.closing = False  # set by stop_all: nothing is started any more
        self.wakes = TokenBucket(settings.wake_rate, settings.wake_burst)  # starts for clients
        self.metrics = Metrics()  # the gateway puts its own here (gateway/metrics.py)
        # per-database leases in storage (storage/leases.py), named after this data root (the
        # name is read or made on first use, once the data root exists)
        self.leases = Leases(databases.store.backend,
                             lambda: settings.gateway_id or self.catalog.identity(),
                             settings.lease_seconds)
        self._conflicts: set[str] = set()  # unsaved copies another gateway has taken over
        self.after_create: Callable[[], None] | None = None  # the gateway refills spare clones
        # instance_uid_base: each database's Postgres as its own OS user (storage/instance_uids.py)
        self.uids = InstanceUids(settings.instance_uid_base, settings.instance_uid_count,
                                 self.catalog) if settings.instance_uid_base else None
        # instance_memory_mb & co. (gateway/compute/cgroups.py): the groups are set up at the first start
        self.limits = Limits(settings.instance_memory_mb, settings.instance_cpu_weight,
                             settings.instance_max_pids)
        self._cgroups: Cgroups | None | bool = False  # False: not set up yet

    def make_socket_root(self) -> None:
        """The directory of the instances' socket directories; with instance uids, every uid
        must pass through it to its own."""
        self.catalog.run_as.make_dir(self.settings.socket_path, 0o711 if self.uids else 0o700)

    @property
    def starting(self) -> set[str]:
        """Ids with a start in progress (holding a slot under max_instances)."""
        return set(self._starting)

    def _lock(self, db_id: str) -> asyncio.Lock:
        return self._locks.setdefault(db_id, asyncio.Lock())

    # --- the public surface ------------------------------------------------------------------
    async def acquire(self, db_id: str, *, create_verifier: str | None = None) -> Instance:
        """A running instance with one more client. With `create_verifier`, a database that
        does not exist yet is created first (role postgres gets that SCRAM verifier: the very
        one the client was authenticated against, so that its keys open the instance too)."""
        async with self._lock(db_id):
            inst = self.instances.get(db_id)
            if inst is not None and not inst.alive:
                # its postmaster died and the watcher has not run yet: retire it here, or the
                # start below would find this database's file lock still held by it
                self._forget(inst)
            if inst is None or not inst.alive:
                if self.closing:  # a client that waited through stop_all starts nothing
                    raise errors.shutting_down()
                await self._wake_turn()
                by = self._storage_deadline()  # one deadline for claim, catch-up and restore
                async with self._claimed(db_id, create_verifier is not None, by) as may_create:
                    if not self.catalog.exists(db_id) and await self._restore(db_id, by) is None:
                        if create_verifier is None:
                            raise errors.unknown_database(db_id)
                        if not may_create:
                            raise errors.known_elsewhere(db_id)
                        inst = await self._create(db_id, create_verifier)
                    else:
                        self._require_secured(db_id)
                        inst = await self._start(db_id)
            return self._hold(inst)

    async def acquire_running(self, db_id: str) -> Instance | None:
        """Like `acquire`, for an instance running now; None instead of starting one."""
        async with self._lock(db_id):
            inst = self.instances.get(db_id)
            return self._hold(inst) if inst is not None and inst.alive else None

    @staticmethod
    async def exited(inst: Instance, wait: float = 5.0) -> bool:
        """After a login found the instance's socket gone or refusing: whether its postmaster
        has exited, waiting up to `wait` for it (one on its way out removes its socket first,
        and the loop may not have seen the exit yet). The next `acquire` then retires it and
        starts a new one."""
        proc = inst.process.proc
        if proc is None:
            return True
        try:
            await asyncio.wait_for(proc.wait(), wait)
        except asyncio.TimeoutError:
            return False
        return True

    @staticmethod
    def _hold(inst: Instance) -> Instance:
        inst.clients += 1
        inst.last_used = time.monotonic()
        return inst

    async def _wake_turn(self) -> None:
        """Wait for a token to start an instance (wake_rate), at most start_timeout."""
        wait = self.wakes.reserve(self.settings.start_timeout)
        if wait is None:
            raise errors.too_many_starting()
        if wait > 0:
            await asyncio.sleep(wait)

    def release(self, inst: Instance) -> None:
        inst.clients = max(0, inst.clients - 1)
        inst.last_used = time.monotonic()

    async def roles(self, db_id: str) -> dict[str, roles_mod.Role] | None:
        """Roles and verifiers: read fresh from the running instance (as Postgres would check
        them), else the metadata saved beside the database (it cannot change while stopped).
        None if the database does not exist. A login that arrives while the database is being
        created (development mode) waits for it: its roles are not there before."""
        creating = self._creating.get(db_id)
        if creating is not None:
            await creating.wait()
        inst = self.instances.get(db_id)
        if inst is not None and inst.alive:
            try:
                await self._refresh_roles(inst)
                return inst.roles
            except (psycopg.Error, OSError, asyncio.TimeoutError) as e:
                log.warning("reading roles from running %s failed (%s); using saved metadata", db_id, e)
        with storage_failures(db_id):
            return await self.databases.roles(db_id)

    async def create(self, db_id: str, password: str, place: Placer | None = None,
                     major: str | None = None) -> Instance:
        """Create a database and leave it running (idle); for the CLI and the admin surface.
        `place(id)` makes its PGDATA (atomically; default: a copy of the template)."""
        async with self._lock(db_id):
            if not await self._unknown_to_storage(db_id):
                raise errors.known_elsewhere(db_id)
            async with self._claimed(db_id):
                return await self._create(db_id, scram_verifier(password), place, major)

    async def secure(self, db_id: str, *, drop_untrusted: bool = False) -> securing.Report | None:
        """Bring a database saved by an older pgsni to the roles layout (gateway/compute/securing.py)
        and store the result as a new version; None if it already was. Whatever the local
        copy held is saved first, and on failure the stored version is put back: nothing is
        lost either way, and the version before stays in storage."""
        async with self._lock(db_id), self._claimed(db_id):
            inst = self.instances.get(db_id)
            if inst is not None and inst.alive:
                return None  # only a secured database is started
            if not self.catalog.exists(db_id) and await self._restore(db_id) is None:
                raise errors.unknown_database(db_id)
            if dbroles.secured(self.catalog.roles(db_id)):
                return None
            with storage_failures(db_id):
                await self.databases.save(db_id, note="saved before db secure")
            report = await self._secure_copy(db_id, drop_untrusted)
            self.databases.mark_stopped(db_id, changed=True)
            await self._stop(await self._start(db_id), "secured")  # reads its roles, saves it
            if self.databases.state(db_id).dirty:
                raise errors.storage_unavailable(db_id)  # kept locally; saved when storage is back
            return report

    async def _secure_copy(self, db_id: str, drop_untrusted: bool = False) -> securing.Report:
        """Secure the local copy of a stopped database; on failure, a copy that came from
        storage is replaced by the stored version again."""
        lock = self.catalog.lock(db_id).acquire()
        try:
            self.make_socket_root()
            return await securing.secure(
                self.installs.for_pgdata(self.catalog.pgdata(db_id)).bindir,
                self.catalog.pgdata(db_id), self.catalog.run_as,
                self.settings.socket_path / f"sec-{secrets.token_hex(4)}", self.catalog.log_file(db_id),
                options=self.settings.postgres_options, timeout=self.settings.start_timeout,
                drop_untrusted=drop_untrusted)
        except BaseException:
            cur = await self.databases.current(db_id, fresh=True)
            if cur is not None:
                with contextlib.suppress(StorageError):
                    await self.databases.install(db_id, cur.manifest)
            raise
        finally:
            lock.release()

    def _require_secured(self, db_id: str) -> None:
        if not dbroles.secured(self.catalog.roles(db_id)):
            raise errors.not_secured(db_id)

    async def stop(self, db_id: str, reason: str = "requested") -> bool:
        async with self._lock(db_id):
            inst = self.instances.get(db_id)
            if inst is None:
                return False
            await self._stop(inst, reason)
            return True

    @contextlib.asynccontextmanager
    async def stopped(self, db_id: str, reason: str = "requested", *, save: bool = True):
        """Hold `db_id` stopped for the block (lifecycle operations: delete, restore, snapshot):
        stop its instance if one runs (saving its changes, unless not `save`: its files are
        about to go) and keep clients from starting it until the block ends. Yields whether
        an instance was stopped."""
        async with self._lock(db_id):
            inst = self.instances.get(db_id)
            if inst is not None:
                await self._stop(inst, reason, discard=not save)
            # the operation changes storage or the copy: no other gateway may run it meanwhile
            fresh = await self.leases.claim(db_id)
            try:
                if fresh and save:
                    await self.databases.catch_up(db_id)
                yield inst is not None
            finally:
                await self._release_if_saved(db_id)

    # --- transitions for operations, inside a `stopped(db_id)` block -------------------------
    async def save_now(self, db_id: str, note: str):
        """Save the stopped local copy as a new version if it holds changes (`db snapshot`,
        and before an upgrade); the new manifest, or None if there was nothing to save."""
        return await self.databases.save(db_id, note=note)

    async def restore_local(self, db_id: str) -> None:
        """Make sure the stopped database has a local copy (restored from storage)."""
        await self.databases.ensure_local(db_id)

    async def roll_back(self, db_id: str, version: str):
        """Make stored `version` current again and the local copy that version (unsaved local
        changes are saved first): (the version saved before, the target's manifest)."""
        return await roll_back(self.databases, db_id, version)

    async def replace_local(self, db_id: str, built: Path, version: str) -> None:
        """Put `built` (a database directory beside the data root, stored as `version`) in
        place of the local copy."""
        self.databases.forget(db_id)
        await self.databases.put_in_place(db_id, built, version)

    async def remove_local(self, db_id: str) -> None:
        """Delete the local copy (takes its file lock: refused while another process runs it)."""
        await asyncio.to_thread(self.catalog.delete, db_id)
        self.databases.forget(db_id)

    def recover(self) -> list[str]:
        """At start, after `stop_orphans`: copies an earlier gateway left marked running hold
        changes that may not be saved."""
        return self.databases.recover()

    async def stop_all(self) -> None:
        """Stop every instance (at shutdown); one that fails to stop or save is logged, and
        the others are stopped all the same."""
        self.closing = True
        ids = list(self.instances)
        results = await asyncio.gather(*(self.stop(i, "gateway shutdown") for i in ids),
                                       return_exceptions=True)
        for db_id, result in zip(ids, results):
            if isinstance(result, BaseException):
                log.error("stopping %s at shutdown failed: %r", db_id, result)
        try:
            await self.leases.release_idle()  # another gateway may take over at once
        except StorageError as e:
            log.warning("releasing leases at shutdown failed: %s", e)

    @property
    def reap_interval(self) -> float:
        return max(0.05, min(1.0, self.settings.idle_timeout / 4))

    async def reap_idle(self) -> None:
        now = time.monotonic()
        for db_id, inst in list(self.instances.items()):
            if inst.clients == 0 and now - inst.last_used >= self.settings.idle_timeout:
                async with self._lock(db_id):
                    if inst.clients == 0 and self.instances.get(db_id) is inst:
                        await self._stop(inst, "idle")

    async def stop_orphans(self) -> list[str]:
        """At start: stop postmasters an earlier gateway left running (it died without stopping
        them), before anything saves or restarts those databases. A database whose lock another
        live process holds (a CLI command) is left alone."""
        stopped = []
        for db_id in self.catalog.list():
            try:
                lock = self.catalog.lock(db_id).acquire()
            except StorageError:
                continue
            try:
                if await stop_orphan(self.catalog.pgdata(db_id), self.settings.stop_timeout):
                    stopped.append(db_id)
            finally:
                lock.release()
        return stopped

    async def maintain(self) -> None:
        """Retry saving copies whose snapshot failed (storage was down), and keep the local
        cache within its budget (every few seconds, supervised by the gateway)."""
        for db_id in self.databases.dirty_stopped():
            if db_id in self.instances:
                continue
            async with self._lock(db_id):
                if db_id not in self.instances:
                    await self._save_claimed(db_id)
        try:
            await self.databases.evict(set(self.instances), self._lock)
        except StorageError as e:
            log.warning("cache eviction skipped: %s", e)

    async def keep_leases(self) -> None:
        """Renew the lease heartbeat (every ttl/3, supervised by the gateway); fence when it
        lapsed."""
        await self.leases.keep_alive(self.fence)

    async def fence(self) -> None:
        """The heartbeat could not be renewed: stop every instance at once, before another
        gateway may take its database over, without saving (storage is what failed; the saves
        are retried under a fresh lease once it is back). No per-database lock is waited for:
        a stop holding one may itself be stuck on the store."""
        insts = [i for i in self.instances.values() if not i.process.stopping]
        results = await asyncio.gather(*(self._stop(i, "lease heartbeat expired", save=False)
                                         for i in insts), return_exceptions=True)
        for inst, result in zip(insts, results):
            if isinstance(result, BaseException):
                log.error("fencing %s failed: %r", inst.db_id, result)

    # --- internals (callers hold the database's lock) -----------------------------------------
    @contextlib.asynccontextmanager
    async def _claimed(self, db_id: str, creating: bool = False, by: float | None = None):
        """Hold the database's lease for what follows, with the local copy caught up with
        storage (and, `creating`, yielding whether storage knows nothing of the id); give
        the lease back if nothing came of it. Storage must have answered by loop time `by`
        (default: start_timeout from now)."""
        by = by or self._storage_deadline()
        async with self._in_time(db_id, "claiming the database", by):
            # only a database with no local copy may be created here; ask storage before the
            # claim, which would overwrite an expired lease of another gateway
            may_create = creating and not self.catalog.exists(db_id) and await self._unknown_to_storage(db_id)
            with storage_failures(db_id):
                fresh = await self.leases.claim(db_id)
        try:
            if fresh:
                async with self._in_time(db_id, "reading its newest version", by):
                    with storage_failures(db_id):
                        await self.databases.catch_up(db_id)
            yield may_create
        except BaseException:
            await self._release_if_saved(db_id)
            raise

    def _storage_deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.start_timeout

    @staticmethod
    @contextlib.asynccontextmanager
    async def _in_time(db_id: str, doing: str, by: float):
        """Bound storage work by loop time `by`: a store that hangs is told to the client as
        such (57P03 with the reason), in bounded time, not as a handshake that ran out."""
        try:
            async with asyncio.timeout_at(by):
                yield
        except TimeoutError:
            raise errors.storage_unavailable(db_id, f"storage did not answer in time ({doing})") from None

    async def _release_if_saved(self, db_id: str) -> None:
        """Give up the lease once nothing runs on the local copy and storage has all of it."""
        if db_id in self.instances:
            return
        if not self.catalog.exists(db_id):
            await self.leases.release(db_id)
        elif not self.databases.state(db_id).dirty:
            self.leases.release_later(db_id)

    async def _save_claimed(self, db_id: str) -> None:
        """Retry the save of a stopped copy: needs the lease (another gateway may have taken the
        database over meanwhile; then this copy is kept, unsaved, for the operator)."""
        try:
            await self.leases.claim(db_id)
        except LeaseHeld as e:
            if db_id not in self._conflicts:
                self._conflicts.add(db_id)
                log.error("unsaved local copy of %s is not saved: %s took the database over; the "
                          "copy stays in %s for the operator", db_id, e.holder, self.catalog.db_dir(db_id))
            return
        except StorageError as e:
            log.warning("cannot save %s yet: %s", db_id, e)
            return
        await self._save(db_id)
        await self._release_if_saved(db_id)

    async def _restore(self, db_id: str, by: float | None = None):
        """Bring a database that is only in storage onto local disk; None if it is nowhere."""
        began = time.monotonic()
        self.databases.forget(db_id)  # a pointer read during authentication may be stale by now
        with storage_failures(db_id):
            try:
                async with self._in_time(db_id, "restoring the database", by or self._storage_deadline()):
                    restored = await self.databases.ensure_local(db_id)
            except storage_errors.NotFound:
                return None
            except storage_errors.CorruptArchive as e:
                # found by the extraction's checks, which the storage backend's counter never sees
                self.metrics.storage_error(e)
                raise
        if restored is not None:
            self.metrics.wake_phase("restore", time.monotonic() - began)
        return restored

    async def _save(self, db_id: str) -> None:
        if self.leases.enabled and not self.leases.valid():
            log.warning("not saving %s now: this gateway's lease heartbeat lapsed (retried once "
                        "the lease is claimed again)", db_id)
            return
        try:
            await self.databases.save(db_id)
        except storage_errors.PreconditionFailed as e:
            # storage moved past this copy (another writer): keep it aside, retrying cannot help
            kept = self.databases.set_aside(db_id)
            log.error("saving %s conflicts with storage (%s); the local copy was moved to %s for "
                      "the operator", db_id, e, kept)
        except StorageError as e:
            log.error("saving %s to storage failed; the local copy is kept and will be retried: %s",
                      db_id, e)

    async def _create(self, db_id: str, verifier: str, place: Placer | None = None,
                      major: str | None = None) -> Instance:
        done = self._creating[db_id] = asyncio.Event()
        try:
            return await self._create_now(db_id, verifier, place, major)
        finally:
            done.set()
            if self._creating.get(db_id) is done:
                del self._creating[db_id]

    async def _unknown_to_storage(self, db_id: str) -> bool:
        """Whether storage holds nothing at all under `db_id` (no version, no lease of another
        gateway, which may hold acknowledged changes not saved yet): only then may it be made
        anew."""
        with storage_failures(db_id):
            found = await self.databases.stored_keys(db_id)
        if db_id in self.leases.held:
            found = [k for k in found if not k.endswith("/lease.json")]
        return not found

    async def _create_now(self, db_id: str, verifier: str, place: Placer | None,
                          major: str | None) -> Instance:
        with storage_failures(db_id):
            if await self.databases.current(db_id) is not None:
                raise errors.GatewayError(errors.INTERNAL_ERROR, f'database "{db_id}" already exists in storage')
        try:
            if place is None:
                await asyncio.to_thread(self.catalog.create, db_id, major)
            else:
                await place(db_id)
        except storage_errors.DiskFull as e:
            raise errors.disk_full(db_id, str(e)) from e
        except StorageError as e:
            raise errors.GatewayError(errors.INTERNAL_ERROR, str(e)) from e
        try:
            if place is not None:  # an archive from elsewhere: its roles are not ours yet
                await self._secure_new(db_id)
            inst = await self._start(db_id)
            await self._take_over(inst, verifier)
        except BaseException:
            # a half-made database must not stay behind looking real, nor reach storage
            if db_id in self.instances:
                await self._stop(self.instances[db_id], "creation failed", discard=True)
            await asyncio.to_thread(self.catalog.delete, db_id)
            raise
        log.info("created database %s", db_id)
        if self.after_create is not None:
            self.after_create()
        return inst

    async def _secure_new(self, db_id: str) -> None:
        try:
            await self._secure_copy(db_id)
        except securing.SecureError as e:
            raise errors.GatewayError(errors.INTERNAL_ERROR, f'database "{db_id}" cannot be '
                                      f"served safely: {e}") from None

    async def _take_over(self, inst: Instance, verifier: str) -> None:
        """Give role postgres of a new database the SCRAM `verifier`, and read its roles."""
        try:
            async with await dbroles.connect(inst.socket_dir) as conn:
                # the verifier, not the password, goes to Postgres: the plaintext never leaves here
                await conn.execute(psycopg.sql.SQL("ALTER ROLE postgres PASSWORD {}").format(verifier))
            await self._refresh_roles(inst)
        except psycopg.Error as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise errors.GatewayError(errors.INTERNAL_ERROR, f'cannot set up role "postgres" in '
                                      f'database "{inst.db_id}": {reason}') from e

    async def _start(self, db_id: str) -> Instance:
        """Start the database's postmaster in a slot reserved under the instance cap."""
        await self._make_room(db_id)
        try:
            return await self._start_in_slot(db_id)
        finally:
            self._starting.discard(db_id)  # counted in self.instances from here, or not at all

    async def _start_in_slot(self, db_id: str) -> Instance:
        lock = self.catalog.lock(db_id)
        try:
            lock.acquire()
        except StorageError as e:
            raise errors.GatewayError(errors.CANNOT_CONNECT_NOW, str(e),
                                      hint="Stop the other process or wait for it to finish.") from e
        s = self.settings
        try:
            install = self.installs.for_pgdata(self.catalog.pgdata(db_id))
        except PgNotInstalled as e:
            lock.release()
            raise errors.startup_failed(db_id, str(e)) from e
        options = {**extensions.instance_options(install, self.catalog.root, s.trusted_extensions),
                   **instance_connections(s), **s.postgres_options}
        process = PostgresProcess(install.bindir, self.catalog.pgdata(db_id), s.socket_path / db_id,
                                  self.catalog.log_file(db_id), self.catalog.run_as, options)
        inst = Instance(db_id, process, lock)
        try:
            self.make_socket_root()
            process.cgroup = self._cgroup(db_id)
            if self.uids is not None:
                process.run_as = await asyncio.to_thread(self.uids.run_as, db_id)
            await stop_orphan(process.pgdata, s.stop_timeout)
            inst.control = await self._control(inst)
            await asyncio.to_thread(self.databases.mark_running, db_id)
            started = time.monotonic()
            await process.start(s.start_timeout)
        except BaseException as e:
            process.kill_group()
            await self._after_failed_start(inst)
            lock.release()
            if not isinstance(e, (PostgresError, OSError, OSUserError)):
                raise  # cancelled: nothing is left running, and the lock is free
            self.metrics.wake(ok=False)
            log.error("starting %s failed: %s", db_id, e)
            raise errors.startup_failed(db_id, str(e)) from e
        self.starts += 1
        self.metrics.wake(ok=True)
        self.metrics.wake_phase("start", time.monotonic() - started)
        inst.reader = RoleReader(lambda: dbroles.connect(process.socket_dir), dbroles.read_roles,
                                 timeout=min(10.0, s.handshake_timeout / 2))
        self.instances[db_id] = inst
        inst.watcher = asyncio.create_task(self._watch(inst))
        try:
            await self._refresh_roles(inst)
        except (psycopg.Error, OSError) as e:
            log.warning("could not read roles of %s after start: %s", db_id, e)
        log.info("started %s (pid %d) in %.0f ms", db_id, process.pid, (time.monotonic() - started) * 1000)
        return inst

    async def _after_failed_start(self, inst: Instance) -> None:
        """A start that failed or was cancelled may have been marked running; mark it stopped
        (changed if its postmaster wrote anything)."""
        if not self.databases.state(inst.db_id).running:
            return
        try:
            changed = await asyncio.shield(self._written(inst))
            self.databases.mark_stopped(inst.db_id, changed=changed)
        except (OSError, asyncio.CancelledError) as e:
            log.error("recording the failed start of %s failed: %r", inst.db_id, e)

    async def _control(self, inst: Instance) -> pgcontrol.Control | None:
        """The data directory's pg_control now (None if it cannot be read: then any stop
        counts as a change)."""
        try:
            return await asyncio.to_thread(pgcontrol.read, inst.process.bindir, inst.process.pgdata)
        except (pgcontrol.ControlError, OSError, subprocess.SubprocessError) as e:
            log.warning("could not read pg_control of %s: %s", inst.db_id, e)
            return None

    async def _written(self, inst: Instance) -> bool:
        """Whether the instance wrote anything since it started, judged after it stopped."""
        if inst.control is None:
            return True
        after = await self._control(inst)
        if after is None:
            return True
        return await asyncio.to_thread(pgcontrol.written_between, inst.process.pgdata, inst.control, after)

    def _cgroup(self, db_id: str):
        if self._cgroups is False:
            self._cgroups = Cgroups.setup(self.limits)
        return self._cgroups.group(db_id) if self._cgroups else None

    async def _make_room(self, db_id: str) -> None:
        """Reserve a slot under `max_instances` for starting `db_id`, stopping the least
        recently used idle instance if none is free. Only the decision is serialised: the
        victim's stop (and save) runs outside it, so other cold starts are not queued behind
        it; the victim keeps its slot until its postmaster has exited."""
        deadline = time.monotonic() + self.settings.start_timeout
        while True:
            async with self._slots:
                others = [i for i in self.instances.values() if i.db_id != db_id]
                if len(others) + len(self._starting - {db_id}) < self.settings.max_instances:
                    self._starting.add(db_id)
                    return
                # only idle instances whose lock is free: one being started or stopped right
                # now is not a candidate, and taking its lock could deadlock with its own start
                idle = sorted((i for i in others if i.clients == 0 and not self._lock(i.db_id).locked()),
                              key=lambda i: i.last_used)
                if not idle or time.monotonic() > deadline:
                    raise errors.too_many_instances(self.settings.max_instances)
                victim = idle[0]
            async with self._lock(victim.db_id):
                if self.instances.get(victim.db_id) is victim and victim.clients == 0:
                    log.info("evicting %s to make room for %s", victim.db_id, db_id)
                    await self._stop(victim, "evicted (instance cap)")

    async def _stop(self, inst: Instance, reason: str, *, discard: bool = False, save: bool = True) -> None:
        """Stop an instance and save its changes to storage; with `discard`, its files are
        about to be deleted: nothing is read from it or saved; without `save`, changes stay
        local (marked unsaved, retried later). Whatever fails on the way (a full disk writing
        the state, say), the instance is forgotten and its file lock released: nothing is
        left that keeps the database from starting again."""
        stopped = False
        try:
            if inst.alive and not discard:
                try:
                    await self._refresh_roles(inst)  # roles as they are, saved beside the copy
                except (psycopg.Error, OSError, asyncio.TimeoutError) as e:
                    log.warning("could not save roles of %s before stopping: %s", inst.db_id, e)
            if inst.reader is not None:
                await inst.reader.close()
            await inst.process.stop(self.settings.stop_timeout)
            stopped = True
            self._drop(inst)
            changed = not discard and await self._written(inst)
            state = await asyncio.to_thread(self.databases.mark_stopped, inst.db_id, changed=changed)
            if state.dirty and save and not discard:
                await self._save(inst.db_id)
        finally:
            if not stopped:
                inst.process.kill_group()
                self._drop(inst)
            inst.lock.release()
            if inst.watcher and inst.watcher is not asyncio.current_task():
                inst.watcher.cancel()
        if not discard:
            await self._release_if_saved(inst.db_id)
        log.info("stopped %s (%s)", inst.db_id, reason)

    def _drop(self, inst: Instance) -> None:
        if self.instances.get(inst.db_id) is inst:
            del self.instances[inst.db_id]

    async def _watch(self, inst: Instance) -> None:
        proc = inst.process.proc
        assert proc is not None
        code = await proc.wait()
        if inst.process.stopping:
            return
        log.error("postgres for %s exited unexpectedly (code %s); it restarts on the next connection",
                  inst.db_id, code)
        self._forget(inst)

    def _forget(self, inst: Instance) -> None:
        """Drop an instance whose postmaster exited on its own: end its orphaned backends, mark
        the copy changed (it may hold unsaved WAL) and free the file lock. Safe to call twice,
        and it leaves alone a newer instance of the same database."""
        inst.process.kill_group()
        if inst.reader is not None:  # its connection died with the postmaster
            asyncio.ensure_future(inst.reader.close())
        if self.instances.get(inst.db_id) is inst:
            del self.instances[inst.db_id]
            try:
                self.databases.mark_stopped(inst.db_id, changed=True)
            except OSError as e:  # the next start finds it marked running: unsaved all the same
                log.error("recording the crash of %s failed: %s", inst.db_id, e)
        inst.lock.release()

    async def _refresh_roles(self, inst: Instance) -> None:
        """Read roles now, saving them beside the database when they changed."""
        assert inst.reader is not None
        roles = await inst.reader.read()
        if roles != inst.roles:
            await asyncio.to_thread(self.catalog.save_roles, inst.db_id, roles)
            inst.roles = roles


POSTGRES_DEFAULT_CONNECTIONS = 100  # never fewer than Postgres would allow on its own


def instance_connections(s: Settings) -> dict[str, str]:
    """Postgres' max_connections sized so that every client the gateway admits to one
    database gets a backend (the gateway's own connections use the superuser reserve)."""
    if s.max_connections_per_db <= 0:
        return {}
    return {"max_connections": str(max(POSTGRES_DEFAULT_CONNECTIONS, s.max_connections_per_db + SUPERUSER_RESERVE))}


class storage_failures:
    """Turn storage errors into what a client should read (context manager)."""

    def __init__(self, db_id: str) -> None:
        self.db_id = db_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or not isinstance(exc, StorageError):
            return
        log.error("storage error for %s: %s", self.db_id, exc)
        if isinstance(exc, LeaseHeld):
            raise errors.GatewayError(errors.CANNOT_CONNECT_NOW, str(exc), hint=(
                "Connect through that gateway, or retry once it has stopped the database "
                "(after idle_timeout).")) from exc
        if isinstance(exc, storage_errors.StorageUnavailable):
            raise errors.storage_unavailable(self.db_id) from exc
        if isinstance(exc, storage_errors.DiskFull):
            raise errors.disk_full(self.db_id, str(exc)) from exc
        if isinstance(exc, storage_errors.CorruptArchive):
            raise errors.GatewayError(errors.DATA_CORRUPTED,
                                      f'the stored snapshot of database "{self.db_id}" is damaged',
                                      detail=str(exc), hint="The operator can roll back with "
                                      "`pgsni db restore ID --version V`.") from exc
        raise errors.GatewayError(errors.INTERNAL_ERROR, f'storage error for database "{self.db_id}"',
                                  detail=str(exc)) from exc
