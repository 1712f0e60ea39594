"""The life of one database on this gateway: one `Database` object per id, its states as an
explicit enum, and one method per transition. A `Database` is the only code that starts, stops,
saves, restores, evicts, replaces, deletes or fences its database (tests/test_lifecycle_owner.py
fails on any other caller); the instance manager (gateway/compute/instances.py) keeps one per
id and runs the background loops, and the CLI, the admin API, uploads, forks and upgrades ask
it — inside `held()` where they change the copy or storage.

    ABSENT ──create──▶ STARTING
    STORED ──claim lease, restore (fresh pointer), fsync──▶ LOCAL ──start──▶ STARTING
    STARTING ──ready──▶ RUNNING;  STARTING ──failed──▶ LOCAL | CHANGED | ABSENT (a creation)
    RUNNING ──stop: idle, evicted, requested, shutdown──▶ (pg_control: written since start?)
        ├─ no  ──▶ LOCAL (clean: equals its stored version) ──evict──▶ STORED
        └─ yes ──▶ CHANGED ──save──▶ LOCAL            (saved: lease released at once)
    RUNNING ──postmaster died──▶ CHANGED               (may hold WAL not in storage)
    CHANGED ──save fails (storage down)──▶ CHANGED    (retried by `maintain`)
    RUNNING ──heartbeat lapsed──▶ FENCED: every instance stopped at once, no save;
        FENCED ──lease claimed again──▶ CHANGED (then saved) or STARTING
    CHANGED ──storage moved past it (another gateway took over)──▶ CONFLICT:
        set aside in <data_root>/.conflict-<id>-<time>-<hex>; the stored version is used
    LOCAL | CHANGED | STORED ──delete──▶ ABSENT;  held: roll back, replace ──▶ LOCAL

What must survive a crash is written before the transition returns: the copy's state.json
(running, dirty, the version it descends from; storage/cache.py), the version pointer and the
lease in storage. The states only this process can know (STARTING, RUNNING, FENCED) live in
the object; at start-up a copy an earlier gateway left marked running counts as CHANGED.
Saving and restoring happen with the database's lock held; a start holds its lease, its file
lock and a slot under max_instances (reserved before it starts)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import psycopg

from gateway import errors
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.rates import TokenBucket
from storage import errors as storage_errors
from storage import roles as roles_mod
from storage.atomic import remove_tree
from storage.cache import Databases
from storage.errors import StorageError
from storage.forking import fork_version
from storage.leases import LeaseHeld, Leases
from storage.osuser import OSUserError
from storage.snapshots import Manifest

from . import basebackup, dbroles, durability, pgcontrol, pitr, securing, walrestore
from .failures import in_time, storage_failures
from .held import Held
from .postgres import PostgresError
from .running import Instance, Launcher
from .states import EDGES, State

log = logging.getLogger("pgsni.instances")

Placer = Callable[[str], Awaitable[None]]  # makes <data_root>/<id>/pgdata for a new database
# the most a stop waits for the last WAL to reach storage: the stop-time snapshot follows and
# holds it all the same (what is left stays in the spool for the next run)
STOP_UPLOAD_SECONDS = 10.0
# how often a claim asks again while the holder drains (saves the database to give it up)
DRAIN_POLL_SECONDS = 0.3
# a due online base backup that failed is tried again after this long (see base_retry_seconds)
BASE_RETRY_SECONDS = 300.0
# after START_FREE_RETRIES failed starts in a row, logins wait this long before the next start
# (first, most: doubling in between): starts share one rate (wake_rate), which a database
# failing at every start would spend at every login. The first retries come at once: an
# operator who fixed the cause (or a passing fault) finds it working at the next login
START_FREE_RETRIES = 2
START_RETRY_SECONDS = (1.0, 60.0)


@dataclass
class Shared:
    """What the databases of one gateway share: storage, leases, the launcher, the instance
    cap and the wake rate."""
    settings: Settings
    databases: Databases
    leases: Leases
    launcher: Launcher
    metrics: Metrics
    wakes: TokenBucket
    lives: dict[str, "Database"] = field(default_factory=dict)
    slots: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises decisions about the cap
    starting: set[str] = field(default_factory=set)  # slots reserved by starts in progress
    closing: bool = False  # set at shutdown: nothing is started any more
    starts: int = 0  # postmasters started (tests, metrics)
    after_create: Callable[[], None] | None = None  # the gateway refills spare clones
    unexpected: int = 0  # moves against EDGES (a test fails on any)

    def life(self, db_id: str) -> "Database":
        db = self.lives.get(db_id)
        if db is None:
            db = self.lives[db_id] = Database(db_id, self)
        return db

    def running(self) -> dict[str, Instance]:
        return {i: d.instance for i, d in self.lives.items() if d.instance is not None}

    def room(self, for_id: str | None = None) -> "tuple[bool, list[Database]]":
        """Whether a slot under max_instances is free (for `for_id`, whose own instance and
        reservation do not count), and else the instances that could be stopped for one:
        idle, their lock free (one being started or stopped right now is not a candidate,
        and taking its lock could deadlock with its own start), least recently used first."""
        others = [d for d in self.lives.values() if d.instance is not None and d.id != for_id]
        if len(others) + len(self.starting - {for_id}) < self.settings.max_instances:
            return True, []
        idle = [d for d in others if not d.instance.in_use and not d.lock.locked()]
        return False, sorted(idle, key=lambda d: d.instance.last_used)


class Database:
    """One database's life on this gateway (see the module docstring)."""

    def __init__(self, db_id: str, shared: Shared) -> None:
        self.id = db_id
        self.s = shared
        self.lock = asyncio.Lock()  # held by every transition
        self.instance: Instance | None = None
        self.phase: State | None = None  # the last state moved to (None: not touched yet)
        self.history: collections.deque[tuple[float, State, str]] = collections.deque(maxlen=20)
        self._creating: asyncio.Event | None = None  # logins wait for a creation in progress
        self._conflict_told = False
        self._base_lock = asyncio.Lock()  # one online base backup at a time
        self._base_task: asyncio.Task | None = None  # one taken because it was due
        self._shipping_ends: asyncio.Future | None = None  # a crashed instance's shipper, uploading
        self._base_retry_at = 0.0  # after a failed one that was due
        self._base_failures = 0  # in a row, since the last one that succeeded
        self._start_failures = 0  # in a row, since the last start that succeeded
        self._start_retry_at = 0.0
        self._start_failed = ""  # why the last one failed
        self._under_lease: set[asyncio.Event] = set()  # starts, halts and saves in progress (a fence waits)
        self._fencing: Instance | None = None  # the instance a fence stops (it holds no lock)

    @property
    def databases(self) -> Databases:
        return self.s.databases

    @property
    def catalog(self):
        return self.s.databases.catalog

    @property
    def leases(self) -> Leases:
        return self.s.leases

    @property
    def launcher(self) -> Launcher:
        return self.s.launcher

    # --- the state ---------------------------------------------------------------------------
    def move(self, to: State, why: str) -> None:
        """Record a transition; one the diagram does not have is logged and counted."""
        if self.phase is not None and to not in EDGES[self.phase]:
            self.s.unexpected += 1
            log.error("database %s moved from %s to %s (%s), which the lifecycle does not allow",
                      self.id, self.phase.value, to.value, why)
        self.phase = to
        self.history.append((time.time(), to, why))

    def _move_stopped(self, why: str) -> None:
        """To LOCAL or CHANGED as the copy's state.json says (or ABSENT without a copy)."""
        if not self.catalog.exists(self.id):
            self.move(State.ABSENT, why)
        else:
            self.move(State.CHANGED if self.databases.state(self.id).dirty else State.LOCAL, why)

    async def state(self, *, stored: bool | None = None, set_aside: list | None = None) -> State:
        """Where the database is in its life: what only this process knows from the object,
        the rest from the copy's state.json and storage. `stored` (whether storage has a
        current version) and `set_aside` are read here unless the caller has just read them."""
        inst = self.instance
        if inst is not None and inst.alive:
            return State.RUNNING
        if self.id in self.s.starting:
            return State.STARTING
        if self.leases.fencing_needed() and self.id in self.leases.lapsed:
            return State.FENCED
        if set_aside is None:
            set_aside = self.databases.set_aside_copies(self.id)
        if set_aside:
            return State.CONFLICT  # until the operator has dealt with them
        if self.catalog.exists(self.id):
            return State.CHANGED if self.databases.state(self.id).dirty else State.LOCAL
        if stored is None:
            stored = await self.databases.current(self.id, fresh=True) is not None
        return State.STORED if stored else State.ABSENT

    # --- waking: a running instance for clients ----------------------------------------------
    async def wake(self, create_verifier: str | None = None) -> Instance:
        """A running instance with one more client. With `create_verifier`, a database that
        does not exist yet is created first (role postgres gets that SCRAM verifier: the very
        one the client was authenticated against, so that its keys open the instance too)."""
        async with self.lock:
            inst = self.instance
            if inst is not None and self._fenced(inst):
                # not a crash, and no longer this gateway's to start again until its lease is
                # claimed afresh, once the fence is over
                raise errors.storage_unavailable(self.id, "this gateway's lease on the database "
                                                          "lapsed (storage unreachable); it is being stopped")
            if inst is not None and not inst.alive:
                # its postmaster died and the watcher has not run yet: retire it here, or the
                # start below would find this database's file lock still held by it
                self._crashed(inst)
            inst = self.instance
            if inst is None:
                if self.s.closing:  # a client that waited through shutdown starts nothing
                    raise errors.shutting_down()
                if (wait := self._start_retry_at - time.monotonic()) > 0:
                    raise errors.startup_failed(self.id, f"{self._start_failed} (next try in {wait:.1f} s)")
                await self._wake_turn()
                by = self._storage_deadline()  # one deadline for claim, catch-up and restore
                async with self._claimed(create_verifier is not None, by) as may_create:
                    if not self.catalog.exists(self.id) and await self._restore(by) is None:
                        if create_verifier is None:
                            raise errors.unknown_database(self.id)
                        if not may_create:
                            raise errors.known_elsewhere(self.id)
                        inst = await self._create(create_verifier, first_version=True)
                    else:
                        self._require_secured()
                        inst = await self._start()
            return hold(inst)

    async def running_now(self) -> Instance | None:
        """Like `wake`, for an instance running now, held for an early login (Instance.early);
        None instead of starting one, and for one a fence stops (its lease lapsed: `wake`
        then says so)."""
        async with self.lock:
            inst = self.instance
            return (hold(inst, early=True) if inst is not None and inst.alive and not self._fenced(inst)
                    else None)

    async def roles(self, only: str | None = None) -> dict[str, roles_mod.Role] | None:
        """Roles and verifiers: read fresh from the running instance (as Postgres would check
        them; `only`: that role is read fresh, the others are as last read), else the metadata
        saved beside the database (it cannot change while stopped). None if the database does
        not exist. A login that arrives while the database is being created (development mode)
        waits for it: its roles are not there before."""
        if self._creating is not None:
            await self._creating.wait()
        inst = self.instance
        if inst is not None and inst.alive:
            try:
                return await self.launcher.refresh_roles(inst, None if only is None else (only,))
            except (psycopg.Error, OSError, asyncio.TimeoutError) as e:
                log.warning("reading roles from running %s failed (%s); using saved metadata", self.id, e)
        with storage_failures(self.id):
            return await self.databases.roles(self.id)

    async def _wake_turn(self) -> None:
        """Wait for a token to start an instance (wake_rate), at most start_timeout."""
        wait = self.s.wakes.reserve(self.s.settings.start_timeout)
        if wait is None:
            raise errors.too_many_starting()
        if wait > 0:
            await asyncio.sleep(wait)

    # --- creating ----------------------------------------------------------------------------
    async def create(self, verifier: str, place: Placer | None = None, major: str | None = None) -> Instance:
        """Create the database and leave it running (idle); for the CLI and the admin surface.
        `place(id)` makes its PGDATA (atomically; default: a copy of the template)."""
        async with self.lock:
            if not await self._unknown_to_storage():
                raise errors.known_elsewhere(self.id)
            async with self._claimed():
                return await self._create(verifier, place, major)

    async def _create(self, verifier: str, place: Placer | None = None, major: str | None = None,
                      *, first_version: bool = False) -> Instance:
        """`first_version`: with continuous durability, store the new database once before
        clients use it (a database made on connect is otherwise first saved when it stops,
        and the WAL shipped meanwhile would have no version to replay onto)."""
        done = self._creating = asyncio.Event()
        try:
            inst = await self._create_now(verifier, place, major)
            if first_version and durability.enabled(self.s.settings):
                # it starts again at once: its lease stays (given up in the background, it
                # could go after the restart, and another gateway would start it too)
                await self._stop(inst, "storing its first version", keep_lease=True)
                inst = await self._start()
            return inst
        finally:
            done.set()
            if self._creating is done:
                self._creating = None

    async def _unknown_to_storage(self) -> bool:
        """Whether storage holds nothing at all under the id (no version, no lease of another
        gateway, which may hold acknowledged changes not saved yet): only then may it be made
        anew."""
        with storage_failures(self.id):
            found = await self.databases.stored_keys(self.id)
            if any(not k.endswith("/lease.json") for k in found):
                return False
            if not found or self.id in self.leases.held:
                return True
            # only a lease: a free one (given up: leases are written free, not deleted) holds nothing
            return await self.leases.holder_of(self.id) is None

    async def _create_now(self, verifier: str, place: Placer | None, major: str | None) -> Instance:
        db_id = self.id
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
                await self._secure_new()
            inst = await self._start()
            await self.launcher.take_over(inst, verifier)
        except BaseException:
            # a half-made database must not stay behind looking real, nor reach storage
            if self.instance is not None:
                await self._stop(self.instance, "creation failed", discard=True)
            await asyncio.to_thread(self.catalog.delete, db_id)
            self.move(State.ABSENT, "creation failed")
            raise
        log.info("created database %s", db_id)
        if self.s.after_create is not None:
            self.s.after_create()
        return inst

    async def _secure_new(self) -> None:
        try:
            await self.launcher.secure_copy(self.id)
        except securing.SecureError as e:
            raise errors.GatewayError(errors.INTERNAL_ERROR, f'database "{self.id}" cannot be '
                                      f"served safely: {e}") from None

    async def fork_from(self, source: Manifest) -> Manifest:
        """Make `source` (a version of another database) this new database's first version,
        copied inside storage; refused if the id is taken meanwhile."""
        async with self.lock:
            forked = await fork_version(self.databases.store, source, self.id)
            self.databases.forget(self.id)
            self.move(State.STORED, f"forked from {source.db_id}")
            return forked

    async def fork_at(self, sources: list[Manifest], what: str, **target) -> tuple[Manifest, Manifest]:
        """Make another database at a past moment this new database's first version: a version
        of it (the first of `sources` whose base the target does not precede) plus its stored
        WAL replayed up to `target` (`target_time` or `target_lsn`; `what` says which), built
        beside the data root (gateway/compute/pitr.py) and stored only if the id is still free.
        That database is only read. Returns (the version used, the new version)."""
        async with self.lock:
            for i, source in enumerate(sources):
                build = self.catalog.root / f".fork-{self.id}-{secrets.token_hex(4)}"
                try:
                    pgdata, roles = await pitr.build_at(self.launcher, self.databases.store, self.s.settings,
                                                        source, build, **target)
                    forked = await self.databases.store.snapshot(
                        self.id, pgdata, roles, expect=None,
                        note=f"forked from {source.db_id} at {what} (version {source.version} and its WAL)")
                except walrestore.BeforeBase:
                    if i == len(sources) - 1:
                        raise
                    continue  # the target lies in the run before that version: try the older one
                finally:
                    await remove_tree(build)
                self.databases.forget(self.id)
                self.move(State.STORED, f"forked from {source.db_id} at {what}")
                return source, forked
            raise ValueError("no version to fork from")

    # --- securing a database saved by an older pgsni -----------------------------------------
    async def secure(self, *, drop_untrusted: bool = False) -> securing.Report | None:
        """Bring a database saved by an older pgsni to the roles layout (gateway/compute/securing.py)
        and store the result as a new version; None if it already was. Whatever the local
        copy held is saved first, and on failure the stored version is put back: nothing is
        lost either way, and the version before stays in storage."""
        async with self.lock, self._claimed():
            inst = self.instance
            if inst is not None and inst.alive:
                return None  # only a secured database is started
            if not self.catalog.exists(self.id) and await self._restore() is None:
                raise errors.unknown_database(self.id)
            if dbroles.secured(self.catalog.roles(self.id)):
                return None
            with storage_failures(self.id):
                await self.databases.save(self.id, note="saved before db secure")
            report = await self._secure_copy(drop_untrusted)
            self.databases.mark_stopped(self.id, changed=True)
            self.move(State.CHANGED, "secured")
            await self._stop(await self._start(), "secured")  # reads its roles, saves it
            if self.databases.state(self.id).dirty:
                raise errors.storage_unavailable(self.id)  # kept locally; saved when storage is back
            return report

    async def _secure_copy(self, drop_untrusted: bool = False) -> securing.Report:
        """Secure the stopped local copy; on failure, a copy that came from storage is
        replaced by the stored version again."""
        try:
            return await self.launcher.secure_copy(self.id, drop_untrusted)
        except BaseException:
            cur = await self.databases.current(self.id, fresh=True)
            if cur is not None:
                with contextlib.suppress(StorageError):
                    await self.databases.install(self.id, cur.manifest)
            raise

    def _require_secured(self) -> None:
        if not dbroles.secured(self.catalog.roles(self.id)):
            raise errors.not_secured(self.id)

    # --- starting ----------------------------------------------------------------------------
    async def _start(self) -> Instance:
        """Start the postmaster in a slot reserved under the instance cap."""
        await self._make_room()
        try:
            return await self._start_in_slot()
        finally:
            self.s.starting.discard(self.id)  # counted as running from here, or not at all

    async def _start_in_slot(self) -> Instance:
        with self._fence_waits():
            return await self._start_fenced()

    @contextlib.contextmanager
    def _fence_waits(self):
        """For the block (a start, a halt, a save: what the lease must cover to its end), a
        fence waits until it is over before it returns (and the lease is given up)."""
        ends = asyncio.Event()
        self._under_lease.add(ends)
        try:
            yield
        finally:
            ends.set()
            self._under_lease.discard(ends)

    def _check_lease(self) -> None:
        """A start goes on only while its lease holds: once this gateway's heartbeat lapsed
        (and the fence runs), another may take the database over (57P03 for the client)."""
        if not self.leases.holds(self.id):
            raise errors.storage_unavailable(self.id, "this gateway's lease on the database lapsed "
                                                      "while it started (storage unreachable)")

    async def _start_fenced(self) -> Instance:
        """Start the postmaster, unless the lease lapses first: checked before anything runs
        and again once it is ready, before any client is served (a fence waits for it)."""
        db_id, metrics = self.id, self.s.metrics
        self.move(State.STARTING, "start")
        inst = await self._prepare()
        try:
            self._check_lease()
            inst.base_lsn = await asyncio.to_thread(basebackup.newest_base, inst)
            if self._shipping_ends is not None:  # one spool, one shipper: the last one finishes first
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._shipping_ends)
                self._shipping_ends = None
            await self._catch_up_wal(inst)
            self._check_lease()
            await asyncio.to_thread(self.databases.mark_running, db_id)
            began = time.monotonic()
            durability.instance_options(inst, self.s.settings, self._base())
            await self.launcher.launch(inst)
            await durability.start_shipping(inst, self.s.settings, self.databases.store.backend,
                                            self.catalog.root, self._base(), count=self._wal_event)
            self._check_lease()  # lapsed while it started: stopped before serving anyone
        except BaseException as e:
            inst.process.kill_group()
            await durability.stop_shipping(inst, upload=False, timeout=0)
            await self._after_failed_start(inst)
            self.launcher.abandon(inst)
            await self._drop_half_replayed(inst)
            self._move_stopped("start failed")
            if isinstance(e, errors.GatewayError):
                raise
            if not isinstance(e, (PostgresError, OSError, OSUserError, StorageError, psycopg.Error,
                                  pgcontrol.ControlError)):
                raise  # cancelled: nothing is left running, and the lock is free
            metrics.wake(ok=False)
            self._start_failures += 1
            paused = self._start_failures - START_FREE_RETRIES
            first, most = START_RETRY_SECONDS
            wait = min(most, first * 2 ** (paused - 1)) if paused > 0 else 0.0
            self._start_retry_at, self._start_failed = time.monotonic() + wait, str(e)
            log.error("starting %s failed%s: %s", db_id,
                      f" ({self._start_failures} times in a row: next try in {wait:.0f} s at the earliest)"
                      if wait else "", e)
            raise errors.startup_failed(db_id, str(e)) from e
        self._start_failures, self._start_retry_at = 0, 0.0
        self.s.starts += 1
        metrics.wake(ok=True)
        metrics.wake_phase("start", time.monotonic() - began)
        self.instance = inst
        self.move(State.RUNNING, "ready")
        inst.watcher = asyncio.create_task(self._watch(inst))
        try:
            if inst.roles is None:  # none saved beside the copy (the launcher read them)
                await self.launcher.refresh_roles(inst)
            else:  # ready for the first login (and the admin role's settings stored)
                await inst.reader.open()
        except (psycopg.Error, OSError, asyncio.TimeoutError) as e:
            log.warning("could not read roles of %s after start: %s", db_id, e)
        log.info("started %s (pid %d) in %.0f ms", db_id, inst.process.pid, (time.monotonic() - began) * 1000)
        return inst

    async def _catch_up_wal(self, inst: Instance) -> None:
        """Replay the WAL storage holds beyond the copy, if any (gateway/compute/durability.py);
        the replayed copy holds changes its stored version lacks. A copy with unsaved changes is
        not asked about: it ran here after its version, so what storage holds beyond that
        version came from it (another gateway's save would have set it aside at the claim),
        and it starts even while storage is down."""
        if self.databases.state(self.id).dirty:
            return
        began = time.monotonic()
        with storage_failures(self.id):
            control = await durability.catch_up(inst, self.s.settings, self.databases.store.backend,
                                                self._wal_work(), self._base())
        if control is not None:
            inst.control = control
            await asyncio.to_thread(self.databases.mark_stopped, self.id, changed=True)
            self.s.metrics.wake_phase("replay", time.monotonic() - began)
            log.info("replayed the stored WAL of %s in %.0f ms (now timeline %d)", self.id,
                     (time.monotonic() - began) * 1000, control.timeline)

    async def _drop_half_replayed(self, inst: Instance) -> None:
        """A replay of stored WAL that failed half-way leaves a clean copy in recovery, which
        must never start as it is: remove it (storage holds its version), so that the next wake
        restores and replays afresh."""
        if not (inst.process.pgdata / "recovery.signal").exists() or self.databases.state(self.id).dirty:
            return
        log.error("removing the local copy of %s, left half-replayed; the next start restores "
                  "it from storage", self.id)
        try:
            await asyncio.to_thread(self.catalog.delete, self.id)
            self.databases.forget(self.id)
        except (OSError, StorageError) as e:
            log.error("could not remove the half-replayed copy of %s: %s", self.id, e)

    def _wal_work(self) -> Path:
        return self.catalog.root / f".walrestore-{self.id}"

    def _base(self) -> str | None:
        """The WAL prefix of the local copy: the stored version it descends from, or the one
        that version continues (a base backup: storage/snapshots.py)."""
        return self.databases.state(self.id).wal_prefix

    async def replay_to(self, **target) -> bool:
        """For a restore to a point, with the database held and its copy a version saved before
        the target (`target_time` or `target_lsn`): replay the stored WAL up to it and promote
        (gateway/compute/durability.py). Whether anything was replayed."""
        s, backend = self.s.settings, self.databases.store.backend
        return await self._rework_held_copy(
            lambda inst: durability.replay_to(inst, s, backend, self._wal_work(), self._base(), **target))

    async def catch_up_held(self) -> bool:
        """With the database held and its copy stopped: replay the WAL storage holds beyond it
        (a base backup's always), as a start would. Whether anything was replayed."""
        s, backend = self.s.settings, self.databases.store.backend
        return await self._rework_held_copy(
            lambda inst: durability.catch_up(inst, s, backend, self._wal_work(), self._base()))

    async def new_history(self) -> bool:
        """After a roll-back, with the database held: if storage holds WAL of its cluster beyond
        the copy, promote the copy to a new timeline (gateway/compute/durability.py). Whether
        it did (the copy then holds changes its stored version lacks). A base backup is always
        replayed to its end: it cannot start without."""
        s, backend = self.s.settings, self.databases.store.backend
        return await self._rework_held_copy(
            lambda inst: durability.new_history(inst, s, backend, self._wal_work(), self._base()))

    async def _rework_held_copy(self, rework) -> bool:
        """Run `rework(instance)` (a replay) on the stopped copy an operation holds; the copy
        counts as changed if it returned new control data."""
        inst = await self.launcher.prepare(self.id, locked=True)  # the operation holds the lock
        try:
            control = await rework(inst)
        finally:
            self.launcher.abandon(inst)
        if control is None:
            return False
        await asyncio.to_thread(self.databases.mark_stopped, self.id, changed=True)
        return True

    async def _prepare(self) -> Instance:
        try:
            return await self.launcher.prepare(self.id)
        except errors.GatewayError:
            self._move_stopped("start refused")
            raise
        except (OSError, OSUserError) as e:
            self._move_stopped("start failed")
            self.s.metrics.wake(ok=False)
            log.error("starting %s failed: %s", self.id, e)
            raise errors.startup_failed(self.id, str(e)) from e
        except BaseException:
            self._move_stopped("start cancelled")
            raise

    async def _after_failed_start(self, inst: Instance) -> None:
        """A start that failed or was cancelled may have been marked running; mark it stopped
        (changed if its postmaster wrote anything)."""
        if not self.databases.state(self.id).running:
            return
        try:
            changed = await asyncio.shield(self.launcher.written(inst))
            self.databases.mark_stopped(self.id, changed=changed)
        except (OSError, asyncio.CancelledError) as e:
            log.error("recording the failed start of %s failed: %r", self.id, e)

    async def _make_room(self) -> None:
        """Reserve a slot under `max_instances`, stopping the least recently used idle instance
        if none is free. Only the decision is serialised: the victim's stop (and save) runs
        outside it, so other cold starts are not queued behind it; the victim keeps its slot
        until its postmaster has exited."""
        s = self.s
        deadline = time.monotonic() + s.settings.start_timeout
        while True:
            async with s.slots:
                free, idle = s.room(self.id)
                if free:
                    s.starting.add(self.id)
                    return
                if not idle or time.monotonic() > deadline:
                    raise errors.too_many_instances(s.settings.max_instances)
                victim = idle[0]
            await victim.evict_instance(f"to make room for {self.id}")

    # --- stopping ----------------------------------------------------------------------------
    async def stop(self, reason: str = "requested") -> bool:
        async with self.lock:
            await self._after_fence()
            if self.instance is None:
                return False
            await self._stop(self.instance, reason)
            return True

    async def stop_if_idle(self, idle_timeout: float) -> None:
        inst = self.instance
        if inst is None or not _idle(inst, idle_timeout):
            return
        async with self.lock:
            # one a fence is stopping (without the lock) is left to it: not stopped, nor saved, twice
            if _idle(inst, idle_timeout) and self.instance is inst and not self._fenced(inst):
                # to its end even if the reaper is cancelled (shutdown ends the loops first):
                # cut off, its save is lost and nothing else saves the stopped copy then
                await to_the_end(self._stop(inst, "idle"))

    async def evict_instance(self, why: str) -> None:
        """Stop the instance if it is still idle (the instance cap needs its slot)."""
        inst = self.instance
        if inst is not None and self._fenced(inst):
            # a fence stops it (without the lock): its slot is free once it has halted; not
            # waiting here, the caller would pick it again at once, never yielding the loop
            for ends in list(self._under_lease):
                await ends.wait()
            return
        async with self.lock:
            if inst is not None and self.instance is inst and not inst.in_use and not self._fenced(inst):
                log.info("evicting %s %s", self.id, why)
                await self._stop(inst, "evicted (instance cap)")

    async def _stop(self, inst: Instance, reason: str, *, discard: bool = False, save: bool = True,
                    fencing: bool = False, keep_lease: bool = False) -> None:
        """Stop an instance and save its changes to storage; with `discard`, its files are
        about to be deleted: nothing is read from it or saved; without `save`, changes stay
        local (marked unsaved, retried later); `fencing`: no save, and the state is FENCED;
        `keep_lease`: it starts again at once, so its lease is not given up. Whatever fails on the way (a full disk writing
        the state, say), the instance is forgotten and its file lock released: nothing is
        left that keeps the database from starting again."""
        stopped = False
        if self._base_task is not None and self._base_task is not asyncio.current_task():
            self._base_task.cancel()  # the stop saves a version of its own
        try:
            with self._fence_waits():  # a fence that begins now returns once it has halted
                await self.launcher.halt(inst, read_roles=not discard)
            stopped = True
            self._drop(inst)
            await durability.stop_shipping(inst, upload=not (discard or fencing),
                                           timeout=min(self.s.settings.stop_timeout, STOP_UPLOAD_SECONDS))
            changed = not discard and await self.launcher.written(inst)
            state = await asyncio.to_thread(self.databases.mark_stopped, self.id, changed=changed)
            self.move(State.FENCED if fencing else State.CHANGED if state.dirty else State.LOCAL,
                       f"stopped: {reason}")
            if state.dirty and save and not discard and not fencing:
                await self._save()
        finally:
            if not stopped:
                self._drop(inst)
                await durability.stop_shipping(inst, upload=False, timeout=0)
            inst.lock.release()
            if inst.watcher and inst.watcher is not asyncio.current_task():
                inst.watcher.cancel()
        if not discard and not keep_lease:
            await self._release_if_saved()
        log.info("stopped %s (%s)", self.id, reason)

    def _drop(self, inst: Instance) -> None:
        if self.instance is inst:
            self.instance = None

    async def _watch(self, inst: Instance) -> None:
        proc = inst.process.proc
        assert proc is not None
        code = await proc.wait()
        if inst.process.stopping:
            return
        log.error("postgres for %s exited unexpectedly (code %s); it restarts on the next connection",
                  self.id, code)
        self._crashed(inst)

    def _crashed(self, inst: Instance) -> None:
        """Drop an instance whose postmaster exited on its own: end its orphaned backends, mark
        the copy changed (it may hold unsaved WAL) and free the file lock. Safe to call twice,
        and it leaves alone a newer instance of the same database."""
        inst.process.kill_group()
        if inst.reader is not None:  # its connection died with the postmaster
            asyncio.ensure_future(inst.reader.close())
        if inst.shipper is not None:  # what it received goes to storage all the same
            self._shipping_ends = asyncio.ensure_future(durability.stop_shipping(
                inst, upload=True, timeout=self.s.settings.stop_timeout))
        if self.instance is inst:
            self.instance = None
            self.move(State.CHANGED, "postmaster exited")
            try:
                self.databases.mark_stopped(self.id, changed=True)
            except OSError as e:  # the next start finds it marked running: unsaved all the same
                log.error("recording the crash of %s failed: %s", self.id, e)
        inst.lock.release()

    @property
    def under_lease(self) -> bool:
        """Whether a start, a halt or a save is in progress (see `_fence_waits`)."""
        return bool(self._under_lease)

    async def fence(self) -> None:
        """This gateway's heartbeat lapsed: stop the instance at once without saving (storage
        is what failed; the save is retried under a fresh lease). A postmaster starting now
        stops by itself once ready (its lease lapsed: `_check_lease`), a stop in progress halts
        it, and a save in progress ends (one not begun yet is refused): wait for those, so that
        when the fence returns nothing of the database runs or saves and its lease may be given
        up. Takes no lock: a stop holding it may be saving (bounded by the storage's timeouts)."""
        for ends in list(self._under_lease):
            await ends.wait()
        inst = self.instance
        if inst is None or self._fenced(inst):
            return
        self._fencing = inst
        try:
            with self._fence_waits():  # the whole stop: `_after_fence` waits for it
                await self._stop(inst, "lease heartbeat expired", fencing=True)
        finally:
            self._fencing = None

    async def _after_fence(self) -> None:
        """With the lock held: if a fence is stopping the instance (it takes no lock), wait
        until it has, rather than stopping it a second time beside it."""
        inst = self.instance
        if inst is not None and self._fenced(inst):
            for ends in list(self._under_lease):
                await ends.wait()

    def _fenced(self, inst: Instance) -> bool:
        """Whether a fence stops `inst` (or it shuts down already): the stops that hold the
        lock leave it alone. Its `stopping` is set only once the roles are read."""
        return inst is self._fencing or inst.process.stopping

    async def stop_diverged(self) -> None:
        """The shipper found another history under this database's WAL in storage (a second
        writer): stop at once without saving, and set the copy aside for the operator."""
        async with self.lock:
            inst = self.instance
            if inst is None or inst.shipper is None or inst.shipper.failed is None:
                return
            log.error("the WAL of %s conflicts with storage (%s): another gateway writes it; "
                      "stopping it and setting the local copy aside", self.id, inst.shipper.failed)
            await self._stop(inst, "its WAL conflicts with storage", save=False)
            kept = await asyncio.to_thread(self.databases.set_aside, self.id)
            self.move(State.CONFLICT, "its WAL conflicts with storage")
            log.error("the local copy of %s was moved to %s", self.id, kept)

    # --- online base backups (durability=async) -----------------------------------------------
    async def base_backup(self, reason: str, *, fast: bool = True) -> Manifest | None:
        """Take an online base backup of the running instance and make it the current version
        (gateway/compute/basebackup.py); None if no instance that ships its WAL runs. Clients
        go on meanwhile: the database's lock is held only to begin and to move the pointer,
        and the backup counts as a client (no idle stop cuts it off)."""
        async with self._base_lock:
            async with self.lock:
                inst = self.instance
                if inst is None or not inst.alive or inst.shipper is None:
                    return None
                hold(inst)
            try:
                return await self._take_base(inst, reason, fast)
            finally:
                inst.clients = max(0, inst.clients - 1)
                inst.last_used = time.monotonic()

    async def _take_base(self, inst: Instance, reason: str, fast: bool) -> Manifest:
        began = time.monotonic()
        work = self.catalog.root / f".basebackup-{self.id}"
        try:
            await asyncio.to_thread(shutil.rmtree, work, True)
            await asyncio.to_thread(work.mkdir, 0o700)
            try:
                taken = await basebackup.take(inst, work / "pgdata", fast=fast)
            except basebackup.BaseBackupError as e:
                raise errors.GatewayError(errors.INTERNAL_ERROR, str(e)) from e
            await basebackup.wait_stored(inst, taken)
            with contextlib.suppress(psycopg.Error, OSError, asyncio.TimeoutError):
                await self.launcher.refresh_roles(inst)  # the manifest's roles: today's
            cur = await self.databases.current(self.id, fresh=True)
            state = self.databases.state(self.id)
            if cur is None or cur.manifest.version != state.version:
                raise storage_errors.PreconditionFailed(
                    f"storage holds version {cur and cur.manifest.version} of {self.id}, but the "
                    f"running copy descends from {state.version}; no base backup stored")
            manifest = await self.databases.store.snapshot(
                self.id, taken.pgdata, inst.roles or self.catalog.roles(self.id) or {}, expect=cur,
                note=f"online base backup ({reason})", base_backup=taken.describe(state.wal_prefix),
                make_current=False)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        async with self.lock:
            if self.instance is not inst or not self.leases.holds(self.id):
                raise storage_errors.PreconditionFailed(
                    f"database {self.id} stopped (or lost its lease) while its base backup was "
                    f"stored: version {manifest.version} is kept, not made current")
            await self.databases.base_made_current(self.id, manifest, cur)
        inst.base_lsn, inst.base_at = taken.start_lsn, time.time()
        if inst.shipper is not None:
            inst.shipper.base_taken(taken.timeline, taken.start_lsn)
        log.info("base backup of %s stored as %s in %.1f s (%s; WAL %s to %s)", self.id,
                 manifest.version, time.monotonic() - began, reason, manifest.base_backup["start_lsn"],
                 manifest.base_backup["end_lsn"])
        try:
            await self.databases.store.prune(self.id)
        except StorageError as e:
            log.warning("retention after the base backup of %s failed: %s", self.id, e)
        return manifest

    def _wal_event(self, event: str, n: int) -> None:
        """The shipper's events, for the metrics; after WAL was lost to shipping, a base backup
        at once (fast checkpoint): no stored version restores past the hole until one is
        current, and in durability=sync the commits after it wait for that."""
        self.s.metrics.wal_event(event, n)
        if event == "lost_bytes":
            asyncio.get_running_loop().call_soon(self.base_backup_if_due)

    def base_backup_if_due(self) -> None:
        """Start a base backup in the background if one is due (basebackup.due)."""
        inst = self.instance
        if inst is None or not inst.alive or self.s.closing or self._base_lock.locked() \
                or time.monotonic() < self._base_retry_at:
            return
        why = basebackup.due(inst, self.s.settings)
        if why is not None:
            urgent = inst.shipper is not None and inst.shipper.hole is not None  # see _wal_event
            self._base_task = asyncio.create_task(self._due_base_backup(why, fast=urgent),
                                                  name=f"basebackup-{self.id}")

    async def _due_base_backup(self, why: str, *, fast: bool) -> None:
        try:
            await self.base_backup(why, fast=fast)
            self._base_failures = 0
        except asyncio.CancelledError:
            log.info("base backup of %s given up: the database stopped", self.id)
        except Exception as e:  # noqa: BLE001 -- logged; tried again later
            self._base_failures += 1
            wait = base_retry_seconds(self._base_failures, urgent=fast)
            self._base_retry_at = time.monotonic() + wait
            log.error("base backup of %s (%s) failed; trying again in %.0f s: %s", self.id, why, wait, e)
        finally:
            if self._base_task is asyncio.current_task():
                self._base_task = None

    # --- saving, restoring, evicting ---------------------------------------------------------
    async def retry_save(self) -> None:
        """Retry the save of a stopped copy whose save failed: needs the lease (another gateway
        may have taken the database over meanwhile; then this copy is kept, unsaved, for the
        operator)."""
        async with self.lock:
            if self.instance is not None:
                return
            try:
                await self.leases.claim(self.id)
            except LeaseHeld as e:
                if not self._conflict_told:
                    self._conflict_told = True
                    log.error("unsaved local copy of %s is not saved: %s took the database over; the "
                              "copy stays in %s for the operator", self.id, e.holder, self.catalog.db_dir(self.id))
                return
            except StorageError as e:
                log.warning("cannot save %s yet: %s", self.id, e)
                return
            if self.phase is State.FENCED:
                self.move(State.CHANGED, "lease claimed again")
            await self._save()
            await self._release_if_saved()

    async def _save(self) -> None:
        if not self.leases.holds(self.id):
            log.warning("not saving %s now: this gateway's lease heartbeat lapsed (retried once "
                        "the lease is claimed again)", self.id)
            return
        try:
            with self._fence_waits():
                saved = await self.databases.save(self.id)
        except storage_errors.PreconditionFailed as e:
            # storage moved past this copy (another writer): keep it aside, retrying cannot help
            kept = self.databases.set_aside(self.id)
            self.move(State.CONFLICT, "storage moved past the copy")
            log.error("saving %s conflicts with storage (%s); the local copy was moved to %s for "
                      "the operator", self.id, e, kept)
        except StorageError as e:
            log.error("saving %s to storage failed; the local copy is kept and will be retried: %s",
                      self.id, e)
        else:
            if saved is not None:
                self.move(State.LOCAL, f"saved as {saved.version}")

    async def _restore(self, by: float | None = None):
        """Bring a database that is only in storage onto local disk; None if it is nowhere."""
        began = time.monotonic()
        self.databases.forget(self.id)  # a pointer read during authentication may be stale by now
        with storage_failures(self.id):
            try:
                async with in_time(self.id, "restoring the database", by or self._storage_deadline()):
                    restored = await self.databases.ensure_local(self.id)
            except storage_errors.NotFound:
                return None
            except storage_errors.CorruptArchive as e:
                # found by the extraction's checks, which the storage backend's counter never sees
                self.s.metrics.storage_error(e)
                raise
        if restored is not None:
            self.move(State.LOCAL, f"restored {restored.version}")
            self.s.metrics.wake_phase("restore", time.monotonic() - began)
        return restored

    async def evict_copy(self) -> bool:
        """Remove the stopped local copy if storage holds exactly it (the cache budget)."""
        async with self.lock:
            state = self.databases.state(self.id)
            if self.instance is not None or state.dirty or state.running or not self.catalog.exists(self.id):
                return False
            cur = await self.databases.current(self.id, fresh=True)
            if cur is None or cur.manifest.version != state.version:
                return False  # storage does not hold exactly this copy
            await asyncio.to_thread(self.catalog.delete, self.id)
            self.move(State.STORED, "evicted from the local cache")
            return True

    # --- leases ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _claimed(self, creating: bool = False, by: float | None = None):
        """Hold the lease for what follows, with the local copy caught up with storage (and,
        `creating`, yielding whether storage knows nothing of the id); give the lease back if
        nothing came of it. Storage must have answered by loop time `by` (default:
        start_timeout from now)."""
        by = by or self._storage_deadline()
        async with in_time(self.id, "claiming the database", by):
            # only a database with no local copy may be created here; ask storage before the
            # claim, which would overwrite an expired lease of another gateway
            may_create = creating and not self.catalog.exists(self.id) and await self._unknown_to_storage()
            with storage_failures(self.id):
                fresh = await self._claim_after_drains(by)
        try:
            if fresh:
                async with in_time(self.id, "reading its newest version", by):
                    with storage_failures(self.id):
                        await self._catch_up()
            yield may_create
        except BaseException:
            await self._release_if_saved()
            raise

    async def _claim_after_drains(self, by: float) -> bool:
        """Claim the lease; while the gateway holding it drains (it shuts down and gives the
        database up once saved), wait for that until loop time `by`, so that its clients are
        served here, not refused."""
        loop, waiting, idle = asyncio.get_running_loop(), False, False
        while True:
            try:
                return await self.leases.claim(self.id)
            except LeaseHeld as e:
                if not e.draining or loop.time() + DRAIN_POLL_SECONDS >= by:
                    raise
                if not waiting:
                    log.info("%s: waiting for gateway %s, which is shutting down, to save and give "
                             "it up", self.id, e.holder)
                    waiting = True
                if idle:  # the last look saw no drain, yet the claim was refused again: no spinning
                    await asyncio.sleep(DRAIN_POLL_SECONDS)
                # one series of reads, shared with the logins that wait for the same drain; it
                # ends before `by`, which the caller's own deadline (in_time) enforces as well:
                # cancelled by that one, this wait could not tell the client why
                try:
                    idle = not await asyncio.wait_for(self.leases.drained(self.id, DRAIN_POLL_SECONDS),
                                                      by - loop.time() - DRAIN_POLL_SECONDS)
                except TimeoutError:
                    raise e from None

    async def _catch_up(self) -> None:
        """After a fresh claim: a clean copy older than storage is replaced by the stored
        version; an unsaved one storage moved past is set aside."""
        before = bool(self.databases.set_aside_copies(self.id))
        await self.databases.catch_up(self.id)
        if not before and self.databases.set_aside_copies(self.id):
            self.move(State.CONFLICT, "storage moved past the copy")
        elif self.phase is State.FENCED:
            self._move_stopped("lease claimed again")

    def _storage_deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.s.settings.start_timeout

    async def _release_if_saved(self) -> None:
        """Give up the lease once nothing runs on the local copy and storage has all of it."""
        if self.instance is not None:
            return
        if not self.catalog.exists(self.id):
            await self.leases.release(self.id)
        elif not self.databases.state(self.id).dirty:
            self.leases.release_later(self.id)

    # --- held stopped, for operations ----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def held(self, reason: str = "requested", *, save: bool = True):
        """Hold the database stopped for the block (delete, restore, snapshot, upload, upgrade):
        stop its instance if one runs (saving its changes, unless not `save`: its files are
        about to go), claim its lease and keep clients from starting it until the block ends.
        Yields a `Held`, whose methods are the transitions such operations make."""
        async with self.lock:
            await self._after_fence()
            inst = self.instance
            if inst is not None:
                await self._stop(inst, reason, discard=not save)
            # the operation changes storage or the copy: no other gateway may run it meanwhile
            fresh = await self.leases.claim(self.id)
            try:
                if fresh and save:
                    await self._catch_up()
                yield Held(self, inst is not None)
            finally:
                await self._release_if_saved()


def base_retry_seconds(failures: int, *, urgent: bool) -> float:
    """How long after its `failures`-th failure in a row a due base backup is tried again: 5
    minutes; after WAL was lost to shipping (`urgent`: nothing stored restores past the hole,
    and durability=sync commits wait for it) 10 s, doubling up to those 5 minutes (at the
    gateway's first maintenance round after that moment)."""
    return min(BASE_RETRY_SECONDS, 10.0 * 2 ** (failures - 1)) if urgent else BASE_RETRY_SECONDS


async def to_the_end(aw: Awaitable):
    """Await `aw` to its end even if the caller is cancelled meanwhile; the cancellation is
    raised after."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def _idle(inst: Instance, idle_timeout: float) -> bool:
    """No authenticated client for `idle_timeout`. A client logging in (an early login) puts
    the stop off, so that it is not cut off mid-login, but never beyond twice that: strangers
    who never authenticate must not keep a database running."""
    idle_for = time.monotonic() - inst.last_used
    return not inst.in_use and idle_for >= idle_timeout and (not inst.early or idle_for >= 2 * idle_timeout)


def hold(inst: Instance, *, early: bool = False) -> Instance:
    """Count one more client of a running instance (`early`: one that has not authenticated
    yet, an early login: it does not count as use, see Instance.in_use)."""
    inst.clients += 1
    if early:
        inst.early += 1
    else:
        inst.last_used = time.monotonic()
    return inst
