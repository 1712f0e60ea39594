"""The gateways of the lease simulation (tests/storage/leasesim.py): a machine (what outlives a
crash: name, clocks, disk, network link) and one incarnation of the gateway process on it, a
real `Leases` with the lifecycle of gateway/compute/ modelled around it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.errors import NotFound, StorageError, StorageUnavailable
from storage.leases import Leases

from .sim_network import SimBackend

if TYPE_CHECKING:
    from .leasesim import Simulation

START = 1_700_000_000.0  # virtual time 0 as unix time


def observed(leases_class: type[Leases]) -> type[Leases]:
    """`leases_class`, telling the gateway model of every renewal and lapse."""

    class Observed(leases_class):
        sim: "Gateway"

        async def beat(self) -> None:
            await super().beat()
            self.sim.renewed(self._beat_at)

        def _lapse_if_expired(self) -> None:
            before = set(self.held)
            super()._lapse_if_expired()
            if before - self.held and not self.valid():
                self.sim.lapsed(before - self.held)

    return Observed


@dataclass
class Machine:
    """What outlives a gateway's crash: its name, clocks, disk and network link."""
    name: str
    skew: float  # wall clock minus virtual time
    mono: float  # monotonic clock minus virtual time
    backend: SimBackend
    unsaved: set[str] = field(default_factory=set)  # copies with changes not in storage
    leased: set[str] = field(default_factory=set)  # the lease marks on its disk (Leases.marks)
    incarnation: int = 0
    gateway: "Gateway | None" = None


class Marks:
    """storage/lease_marks.py on a machine's disk (they outlive a crash)."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    async def add(self, db_id: str) -> None:
        self.m.leased.add(db_id)

    async def discard(self, db_id: str) -> None:
        self.m.leased.discard(db_id)

    def ids(self) -> set[str]:
        return set(self.m.leased)


@dataclass
class Instance:
    clients: int = 0
    last_used: float = 0.0
    stopping: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # halted: its clients are cut off


class Gateway:
    """One incarnation of a gateway process: its Leases and the lifecycle around them."""

    def __init__(self, sim: "Simulation", machine: Machine) -> None:
        self.sim, self.m, self.p = sim, machine, sim.params
        self.name = machine.name
        machine.incarnation += 1
        self.owner = f"{self.name}#{machine.incarnation}"
        loop = sim.loop
        self.leases = sim.leases_class(machine.backend, self.name, self.p.ttl, margin=self.p.margin,
                                       clock=lambda: START + loop.time() + machine.skew,
                                       monotonic=lambda: loop.time() + machine.mono,
                                       marks=Marks(machine))
        self.leases.sim = self
        self.instances: dict[str, Instance] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.renewals: list[float] = []  # monotonic starts of successful heartbeats
        self.fenced: list[float] = []  # when on_expired was called
        self.alive = True
        # InstanceManager.recover: the leases an earlier incarnation left are given up, those
        # of unsaved copies once they are saved (maintain)
        for db in sorted(self.leases.left_by_earlier_run() - machine.unsaved):
            self.leases.give_up_later(db)

    # --- observation -------------------------------------------------------------------------
    def now(self) -> float:
        return self.sim.loop.time()

    def renewed(self, started: float) -> None:
        self.renewals.append(started)
        lapse = started + self.p.ttl - self.p.margin - self.m.mono
        self.sim.loop.call_at(lapse + self.p.fence_bound(), self._check_renewed, started, lapse)

    def _check_renewed(self, started: float, lapse: float) -> None:
        """No renewal begun before validity ended: nothing served since then may still run."""
        deadline = lapse + self.m.mono
        if self.alive and not any(started < r <= deadline for r in self.renewals):
            self.sim.monitor.fenced_by(self.owner, lapse, None, self.now())

    def lapsed(self, dbs: set[str]) -> None:
        lapse = self.leases._beat_at + self.p.ttl - self.p.margin - self.m.mono
        self.sim.trace(self.owner, f"lapsed {sorted(dbs)}")
        self._check_told(lapse, lapse + self.p.margin / 2 + 0.1)
        self.sim.loop.call_at(max(self.now(), lapse + self.p.fence_bound()),
                              self.sim.monitor.fenced_by, self.owner, lapse, dbs,
                              max(self.now(), lapse + self.p.fence_bound()))

    def _check_told(self, lapse: float, by: float) -> None:
        """on_expired was called within margin / 2 of the lapse (plus time paused meanwhile),
        as the docstring of storage/leases.py says."""
        later = lapse + self.p.margin / 2 + 0.1 + self.sim.monitor.paused_within(self.owner, lapse, by)
        if later > by + 1e-6 or self.now() < by:
            self.sim.loop.call_at(max(later, by), self._check_told, lapse, max(later, by))
        elif self.alive and not any(lapse - 1e-6 <= t <= by for t in self.fenced):
            self.sim.monitor.violate(f"{self.owner} did not call on_expired within "
                                     f"{by - lapse:.1f} s of its heartbeat's lapse")

    # --- the background loops (gateway/supervise.py every) -----------------------------------
    def start(self) -> None:
        # the reaper runs every idle_timeout / 4 (the gateway's: at most every second, which
        # only makes idle stops a little more punctual, and costs four times the events)
        for interval, step in ((self.leases.next_round, self.keep_leases),
                               (lambda: self.p.idle_timeout / 4, self.reap_idle),
                               (lambda: 10.0, self.maintain)):
            self.sim.loop.spawn(self.owner, self._every(interval, step))

    async def _every(self, interval, step) -> None:
        while True:
            await asyncio.sleep(interval())
            try:
                await step()
            except Exception as e:  # a round's failure; the next round runs all the same
                self.sim.trace(self.owner, f"round failed: {e!r}")

    async def keep_leases(self) -> None:
        await self.leases.keep_alive(self.fence)

    async def fence(self) -> None:
        """InstanceManager.fence: stop every running instance not stopping already, no save;
        also wait for every start, stop or save in progress (each holds its database's lock:
        a start finds its lease lapsed and gives up) and stop what a start left running."""
        self.sim.trace(self.owner, "fences")
        self.fenced.append(self.now())
        stops = [self._stop(db, inst, fencing=True)
                 for db, inst in list(self.instances.items()) if not inst.stopping]
        stops += [self._fence_when_free(db) for db, lock in self.locks.items() if lock.locked()]
        await asyncio.gather(*stops)

    async def _fence_when_free(self, db: str) -> None:
        async with self._lock(db):
            inst = self.instances.get(db)
            if inst is not None and not inst.stopping:
                await self._stop(db, inst, fencing=True)

    async def reap_idle(self) -> None:
        """Database.stop_if_idle; an instance a fence is stopping already is left to it."""
        for db, inst in list(self.instances.items()):
            if inst.clients == 0 and self.now() - inst.last_used >= self.p.idle_timeout:
                async with self._lock(db):
                    if inst.clients == 0 and self.instances.get(db) is inst and not inst.stopping:
                        await self._stop(db, inst)

    async def maintain(self) -> None:
        """Retry the save of stopped copies with unsaved changes (Database.retry_save)."""
        for db in sorted(self.m.unsaved - set(self.instances)):
            async with self._lock(db):
                if db in self.instances:
                    continue
                try:
                    async with asyncio.timeout(self.p.start_timeout):
                        await self.leases.claim(db)
                except (StorageError, TimeoutError) as e:
                    self.sim.trace(self.owner, f"cannot save {db} yet: {type(e).__name__}")
                    continue  # LeaseHeld: another took it over (the unsaved copy is kept)
                await self._save(db)
                self._release_if_saved(db)

    # --- the lifecycle (gateway/compute/lifecycle.py) ----------------------------------------
    def _lock(self, db: str) -> asyncio.Lock:
        return self.locks.setdefault(db, asyncio.Lock())

    async def wake(self, db: str) -> Instance:
        """Database.wake: a running instance with one more client; StorageError or
        TimeoutError if the database cannot be had now."""
        async with self._lock(db):
            inst = self.instances.get(db)
            if inst is None:
                async with asyncio.timeout(self.p.start_timeout):
                    fresh = await self.leases.claim(db)
                    self.sim.monitor.begin(self.owner, db, "serves")
                    try:
                        if fresh:  # catch up with storage
                            await self.m.backend.get(f"dbs/{db}/current.json")
                    except NotFound:
                        pass  # a database never saved yet
                    except BaseException:
                        self.sim.monitor.end(self.owner, db, "catch-up failed")
                        self._release_if_saved(db)
                        raise
                await asyncio.sleep(self.sim.rng.uniform(0.1, self.p.start_max))  # the postmaster
                if not self.leases.holds(db):  # Database._start_in_slot: lapsed meanwhile
                    self.sim.monitor.end(self.owner, db, "start fenced")
                    raise StorageUnavailable(f"the lease of {db} lapsed while it started")
                inst = self.instances[db] = Instance()
                self.m.unsaved.add(db)  # marked running: changed unless stopped cleanly and saved
            inst.clients += 1
            return inst

    async def _stop(self, db: str, inst: Instance, *, fencing: bool = False) -> None:
        inst.stopping = True
        await asyncio.sleep(self.sim.rng.uniform(0.1, self.p.stop_max))  # the halt
        self.instances.pop(db, None)
        inst.gone.set()
        self.sim.monitor.end(self.owner, db, "fenced" if fencing else "stopped")
        if not fencing:
            await self._save(db)
        self._release_if_saved(db)

    async def _save(self, db: str) -> None:
        """Database._save: only while the lease is held (a lapse voids it even if the heartbeat
        was renewed since)."""
        if not self.leases.holds(db):
            return
        self.sim.monitor.begin(self.owner, db, "saves")
        outcome = "save failed"
        try:
            await self.m.backend.put(f"dbs/{db}/current.json", self.owner.encode())
            self.m.unsaved.discard(db)
            outcome = "saved"
        except StorageError:
            pass
        finally:
            self.sim.monitor.end(self.owner, db, outcome)

    def _release_if_saved(self, db: str) -> None:
        if db not in self.instances and db not in self.m.unsaved:
            self.leases.release_later(db)

    async def client(self, db: str, until: float, leaves: float) -> None:
        """A client that wants `db` until `until`, retrying; once in, it stays until `leaves`
        (or connects again if its instance stops before)."""
        while self.now() < until:
            try:
                inst = await self.wake(db)
            except (StorageError, TimeoutError) as e:
                self.sim.trace(self.owner, f"client of {db} refused: {type(e).__name__}")
                await asyncio.sleep(self.sim.rng.uniform(1, self.p.client_retry))
                continue
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(inst.gone.wait(), max(0.0, leaves - self.now()))
            finally:
                inst.clients -= 1
                inst.last_used = self.now()
            if not inst.gone.is_set():
                return
