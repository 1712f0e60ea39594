"""The databases of this gateway, one lifecycle each (gateway/compute/lifecycle.py): `acquire(id)`
makes sure one instance is running (exactly one, however many clients arrive at once) and
counts its clients; the background loops stop idle instances, retry failed saves, keep the local
cache within its budget and the leases alive, and fence when the heartbeat lapsed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, Iterator

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.rates import TokenBucket
from gateway.wire.scram import scram_verifier
from storage import roles as roles_mod
from storage.cache import Databases
from storage.errors import StorageError
from storage.lease_marks import LeaseMarks
from storage.leases import Leases
from storage.snapshots import Manifest

from . import securing
from .failures import storage_failures
from .lifecycle import Database, Placer, Shared
from .running import Instance, Launcher, exited

log = logging.getLogger("pgsni.instances")


class InstanceManager:
    def __init__(self, settings: Settings, databases: Databases) -> None:
        self.settings = settings
        self.databases = databases
        self.catalog = databases.catalog
        self.launcher = Launcher(settings, self.catalog)
        self.installs = self.launcher.installs
        self.uids = self.launcher.uids
        # per-database leases in storage (storage/leases.py), named after this data root (the
        # name is read or made on first use, once the data root exists); the leases that may
        # name it are marked in the data root, for a restart to give up what a crash left
        leases = Leases(databases.store.backend, lambda: settings.gateway_id or self.catalog.identity(),
                        settings.lease_seconds, marks=LeaseMarks(self.catalog.root / ".leases"))
        databases.store.may_change = leases.holds  # no pointer moves once the lease lapsed
        self.shared = Shared(settings, databases, leases, self.launcher, Metrics(),
                             TokenBucket(settings.wake_rate, settings.wake_burst))
        self.leases = leases

    # --- what the gateway and the tests read -------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self.shared.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics) -> None:  # the gateway puts its own here (gateway/metrics.py)
        self.shared.metrics = metrics

    @property
    def after_create(self) -> Callable[[], None] | None:
        return self.shared.after_create

    @after_create.setter
    def after_create(self, fn: Callable[[], None] | None) -> None:  # the gateway refills spare clones
        self.shared.after_create = fn

    @property
    def instances(self) -> dict[str, Instance]:
        """The running instances by id (a snapshot)."""
        return self.shared.running()

    @property
    def starting(self) -> set[str]:
        """Ids with a start in progress (holding a slot under max_instances)."""
        return set(self.shared.starting)

    def full(self) -> bool:
        """No slot free under max_instances and no idle instance to stop for one: a new
        database would be refused here (a fleet places it on a gateway with room)."""
        free, idle = self.shared.room()
        return not free and not idle

    @property
    def starts(self) -> int:
        return self.shared.starts

    @property
    def closing(self) -> bool:
        """Set by stop_all: nothing is started any more."""
        return self.shared.closing

    @closing.setter
    def closing(self, closing: bool) -> None:
        self.shared.closing = closing

    @property
    def wakes(self) -> TokenBucket:
        return self.shared.wakes

    def database(self, db_id: str) -> Database:
        """The lifecycle of `db_id` (made on first use)."""
        return self.shared.life(db_id)

    def make_socket_root(self) -> None:
        self.launcher.make_socket_root()

    # --- for clients -------------------------------------------------------------------------
    async def acquire(self, db_id: str, *, create_verifier: str | None = None) -> Instance:
        """A running instance of `db_id` with one more client (see Database.wake)."""
        return await self.database(db_id).wake(create_verifier)

    async def acquire_running(self, db_id: str) -> Instance | None:
        """The instance running now, held for an early login (see Database.running_now)."""
        return await self.database(db_id).running_now()

    def release(self, inst: Instance, *, used: bool = True) -> None:
        """A client gave the instance back; `used`: it had authenticated (an early login given
        back unused is no use: it does not put off the idle stop)."""
        inst.clients = max(0, inst.clients - 1)
        if used:
            inst.last_used = time.monotonic()

    exited = staticmethod(exited)

    async def roles(self, db_id: str, only: str | None = None) -> dict[str, roles_mod.Role] | None:
        """The roles to authenticate against (`only`: read fresh for that one, see
        Database.roles); None for a database that exists nowhere, unless a draining gateway
        holds it: one created there and not yet saved is known once it is."""
        roles = await self._roles(db_id, only)
        if roles is None and await self.leases.drained(db_id):
            self.databases.forget(db_id)
            roles = await self._roles(db_id, only)
        return roles

    async def _roles(self, db_id: str, only: str | None = None) -> dict[str, roles_mod.Role] | None:
        """A database this gateway has no lifecycle for (nothing of it runs, starts or is being
        created here) is looked up at rest, without making one: clients name any id they like,
        before they have authenticated, and an id that exists nowhere must leave nothing."""
        life = self.shared.lives.get(db_id)
        if life is not None:
            return await life.roles(only)
        with storage_failures(db_id):
            return await self.databases.roles(db_id)

    # --- for operations ----------------------------------------------------------------------
    async def create(self, db_id: str, password: str, place: Placer | None = None,
                     major: str | None = None) -> Instance:
        """Create a database and leave it running (idle)."""
        return await self.database(db_id).create(scram_verifier(password), place, major)

    async def fork(self, new_id: str, source: Manifest) -> Manifest:
        return await self.database(new_id).fork_from(source)

    async def fork_at(self, new_id: str, sources: list[Manifest], what: str, **target) -> tuple[Manifest, Manifest]:
        return await self.database(new_id).fork_at(sources, what, **target)

    async def secure(self, db_id: str, *, drop_untrusted: bool = False) -> securing.Report | None:
        return await self.database(db_id).secure(drop_untrusted=drop_untrusted)

    async def stop(self, db_id: str, reason: str = "requested") -> bool:
        return await self.database(db_id).stop(reason)

    async def base_backup(self, db_id: str, reason: str = "requested") -> Manifest | None:
        """An online base backup of the running database, made current (Database.base_backup);
        None if it does not run here with WAL shipping."""
        return await self.database(db_id).base_backup(reason)

    def stopped(self, db_id: str, reason: str = "requested", *, save: bool = True):
        """`async with manager.stopped(id) as held:` the database held stopped for an operation
        (Database.held); `held` has the transitions it may make."""
        return self.database(db_id).held(reason, save=save)

    # --- the gateway's start and shutdown ----------------------------------------------------
    async def stop_orphans(self) -> list[str]:
        return await self.launcher.stop_orphans()

    def recover(self) -> list[str]:
        """At start, after `stop_orphans`: copies an earlier gateway left marked running hold
        changes that may not be saved (`maintain` saves them under their lease, then gives it
        up); the other leases it left marked are given up (keep_leases)."""
        recovered = self.databases.recover()
        unsaved = set(self.databases.dirty_stopped())
        for db_id in sorted(self.leases.left_by_earlier_run() - unsaved):
            self.leases.give_up_later(db_id)
        return recovered

    async def stop_all(self) -> None:
        """Stop every instance (at shutdown); one that fails to stop or save is logged, and
        the others are stopped all the same."""
        self.shared.closing = True
        # also those being started (or otherwise held) now: the stop waits for their lock, else
        # a start in progress would leave its postmaster running after the gateway exited
        ids = [d.id for d in list(self.shared.lives.values()) if d.instance is not None or d.lock.locked()]
        results = await asyncio.gather(*(self.stop(i, "gateway shutdown") for i in ids),
                                       return_exceptions=True)
        for db_id, result in zip(ids, results):
            if isinstance(result, BaseException):
                log.error("stopping %s at shutdown failed: %r", db_id, result)
        try:
            await self.leases.release_idle()  # another gateway may take over at once
        except StorageError as e:
            log.warning("releasing leases at shutdown failed: %s", e)

    # --- background loops (supervised by the gateway) ----------------------------------------
    @property
    def reap_interval(self) -> float:
        return max(0.05, min(1.0, self.settings.idle_timeout / 4))

    async def reap_idle(self) -> None:
        each = Round("the idle stop")
        for db_id in list(self.instances):
            with each.turn(db_id):
                await self.database(db_id).stop_if_idle(self.settings.idle_timeout)
        each.finish()

    async def maintain(self) -> None:
        """Stop instances whose WAL another writer's conflicts with, start the base backups that
        are due (in the background), retry saving copies whose snapshot failed (storage was
        down), and keep the local cache within its budget (every few seconds)."""
        each = Round("maintenance")
        for db_id, inst in list(self.instances.items()):
            with each.turn(db_id):
                if inst.shipper is not None and inst.shipper.failed is not None:
                    await self.database(db_id).stop_diverged()
                else:
                    self.database(db_id).base_backup_if_due()
        for db_id in self.databases.dirty_stopped():
            if db_id not in self.instances:
                with each.turn(db_id):
                    await self.database(db_id).retry_save()
        try:
            await self._keep_budget()
        except StorageError as e:
            log.warning("cache eviction skipped: %s", e)
        each.finish()

    async def _keep_budget(self) -> None:
        """Remove least recently used clean copies until the stopped ones fit the budget."""
        budget = self.databases.budget_bytes
        if budget <= 0:
            return
        candidates = await asyncio.to_thread(self.databases.evictable, set(self.instances))
        total = sum(size for _, _, size in candidates)
        for _, db_id, size in candidates:
            if total <= budget:
                break
            if await self.database(db_id).evict_copy():
                total -= size
                log.info("evicted local copy of %s (%d MB) to stay within the cache budget",
                         db_id, size >> 20)

    async def keep_leases(self) -> None:
        """Renew the lease heartbeat (every ttl/3); fence when it lapsed."""
        await self.leases.keep_alive(self.fence)

    async def fence(self) -> None:
        """The heartbeat could not be renewed: stop every instance at once, before another
        gateway may take its database over, without saving (storage is what failed; the saves
        are retried under a fresh lease once it is back). Starts and saves in progress end first
        (a start gives up before serving: its lease lapsed), and what a start left running is
        stopped."""
        lives = [d for d in list(self.shared.lives.values()) if d.instance is not None or d.under_lease]
        results = await asyncio.gather(*(d.fence() for d in lives), return_exceptions=True)
        for db, result in zip(lives, results):
            if isinstance(result, BaseException):
                log.error("fencing %s failed: %r", db.id, result)


class Round:
    """One background round over many databases: what fails for one leaves the others their
    turn (else one database's error would end every round before the databases after it).
    `finish()` then raises the first error, so the supervisor logs and counts the round as
    failed (pgsni_background_errors_total); any further ones are logged here."""

    def __init__(self, doing: str) -> None:
        self.doing = doing
        self.first: Exception | None = None

    @contextlib.contextmanager
    def turn(self, db_id: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- raised again by finish(), or logged
            if self.first is None:
                e.add_note(f"({self.doing} of database {db_id})")
                self.first = e
            else:
                log.error("%s failed for %s as well", self.doing, db_id, exc_info=True)

    def finish(self) -> None:
        first, self.first = self.first, None
        if first is not None:
            raise first
