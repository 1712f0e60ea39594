"""A deterministic simulation of the lease protocol (storage/leases.py) among several gateways
sharing one store, on virtual time (tests/support/virtual_loop.py), with faults drawn from one
seed: partitions between a gateway and the store (requests fail, or hang), slow requests and
lost answers (tests/storage/sim_network.py), crashes and restarts under the same holder name,
and pauses (no code of that gateway runs for a while).

Each gateway (tests/storage/sim_gateway.py) is a real `Leases` over its own connection, driven
the way the gateway drives it (gateway/compute/instances.py, gateway/compute/lifecycle.py): a
keep_alive loop every `next_round()` whose on_expired stops its instances (fencing: no save),
clients that wake a database (claim, catch up with storage, start), idle stops (halt, save
under a valid heartbeat, release), and retried saves of stopped copies with unsaved changes
(claim, save, release). A database counts as served by a gateway from the moment its claim
returns until its instance has halted, and as saved while a save runs.

Checked as it runs (`Monitor`, tests/storage/sim_invariants.py): no two gateways serve or save
one database at once; a gateway whose heartbeat lapsed has called on_expired within margin / 2
and halted what it served within `Params.fence_bound()` (margin / 2, then a start in progress
and a halt; plus, for both, any time it was paused); and after the faults end, each database wanted by a live gateway is served by it
within `Params.liveness_bound()`.
`run(seed)` returns the violations with the last events before the first one.

The lifecycle modelled is the gateway's (gateway/compute/lifecycle.py, instances.py): a fence
waits for starts, stops and saves in progress, a start gives up before serving once its lease
lapsed, nothing is saved without the lease held, and a restart gives up the leases an earlier
run left marked (storage/lease_marks.py; here the marks live on the simulated machine)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import zlib
from dataclasses import dataclass

from storage.leases import STAMP_RESOLUTION, Leases

from ..support.virtual_loop import VirtualTimeLoop
from .fake_store import Store
from .sim_gateway import START, Gateway, Machine, observed
from .sim_invariants import Monitor, Trace
from .sim_network import SimBackend, Weather


@dataclass(frozen=True)
class Params:
    gateways: tuple[int, int] = (3, 5)
    databases: tuple[int, int] = (2, 4)
    ttl: float = 60.0  # the defaults: lease_seconds 60, margin 10
    margin: float = 10.0
    storage_timeout: float = 10.0  # one request with all its retries
    start_timeout: float = 30.0  # bounds a client's claim and catch-up
    idle_timeout: float = 20.0
    start_max: float = 3.0  # a postmaster's start
    stop_max: float = 4.0  # a fast shutdown
    skew_max: float = 30.0  # each gateway's wall clock is off by up to this
    pause_max: float = 5.0
    faults_for: float = 600.0  # then every fault heals
    fault_every: float = 20.0  # mean seconds between two faults
    client_every: float = 6.0  # mean seconds between two clients
    client_retry: float = 10.0  # a refused client tries again within this
    # whether a request the store has not taken when its caller gives up may still be taken
    # later (on its way, its caller's connection closed), as on a real network
    late_writes: bool = True

    def fence_bound(self) -> float:
        """How long after its heartbeat lapsed a gateway may still serve (not counting pauses):
        keep_alive is due when validity ends and its heartbeat write takes at most margin / 2;
        then a start in progress ends, and the halt."""
        return self.margin / 2 + self.start_max + self.stop_max + 0.1

    def liveness_bound(self) -> float:
        """After the faults end, how long until a wanted database is served: another gateway's
        clients end, its instance idles out, halts, saves and releases (or its heartbeat
        expires by the store's stamps and a clock up to 2 x skew_max behind); then a claim."""
        let_go = self.idle_timeout + 1 + self.stop_max + 2 * self.storage_timeout
        expire = self.ttl + self.margin + 2 * STAMP_RESOLUTION + 2 * self.skew_max
        return max(let_go, expire) + self.client_retry + self.start_timeout + self.start_max


class DbId(str):
    """A database id whose hash does not change with PYTHONHASHSEED: Leases keeps ids in sets,
    and the order it walks them in decides the order of its requests, and so the run."""

    def __hash__(self) -> int:
        return zlib.crc32(self.encode())


class Simulation:
    def __init__(self, seed: int, params: Params = Params(), leases_class: type[Leases] = Leases) -> None:
        self.seed, self.params = seed, params
        self.rng = random.Random(seed)
        self.loop = VirtualTimeLoop()
        self.trace = Trace(self.loop)
        self.monitor = Monitor(params, self.loop, self.trace)
        self.leases_class = observed(leases_class)
        self.store = Store(lambda: math.floor(START + self.loop.time()))  # S3: whole seconds
        p, rng = params, self.rng
        self.dbs = [DbId(f"db{i}") for i in range(rng.randint(*p.databases))]
        self.machines = [
            Machine(f"gw{i}", rng.uniform(-p.skew_max, p.skew_max), rng.uniform(0, 1e5),
                    SimBackend(self.store, self.loop, rng, p.storage_timeout, p.late_writes))
            for i in range(rng.randint(*p.gateways))]

    def run(self) -> "Outcome":
        self.loop.set_exception_handler(self._unexpected)
        try:
            self.loop.run_until_complete(self.loop.spawn(None, self._drive()))
        finally:
            self.monitor.over = True
            self.loop.close()
        return Outcome(self.seed, self.monitor.violations, self.monitor.trail or list(self.trace.events),
                       self.params, self.leases_class.__bases__[0])

    def _unexpected(self, loop, context) -> None:
        if "destroyed but it is pending" not in context.get("message", ""):
            self.monitor.violate(f"unexpected error in the simulation: {context}")

    # --- gateways ----------------------------------------------------------------------------
    def boot(self, m: Machine) -> None:
        m.gateway = Gateway(self, m)
        m.gateway.start()
        self.trace(m.name, f"starts ({m.gateway.owner})")

    def crash(self, m: Machine) -> None:
        gw = m.gateway
        if gw is None:
            return
        self.loop.kill(gw.owner)
        gw.alive, m.gateway = False, None
        for db in list(gw.instances):
            m.unsaved.add(db)
        for db in self.dbs:
            self.monitor.end(gw.owner, db, "crashed")
        self.trace(m.name, "crashes")

    # --- the schedule ------------------------------------------------------------------------
    async def _drive(self) -> None:
        p, rng = self.params, self.rng
        for m in self.machines:
            self.boot(m)
        next_fault = rng.expovariate(1 / p.fault_every)
        next_client = rng.expovariate(1 / p.client_every)
        while (now := self.loop.time()) < p.faults_for:
            if next_fault <= next_client:
                await asyncio.sleep(max(0.0, next_fault - now))
                self._fault(rng.choice(self.machines))
                next_fault += rng.expovariate(1 / p.fault_every)
            else:
                await asyncio.sleep(max(0.0, next_client - now))
                m = rng.choice(self.machines)
                if m.gateway is not None:
                    gives_up = min(p.faults_for, now + rng.uniform(0, 60))
                    leaves = min(p.faults_for, gives_up + rng.expovariate(1 / 30))
                    self.loop.spawn(m.gateway.owner, m.gateway.client(rng.choice(self.dbs), gives_up, leaves))
                next_client += rng.expovariate(1 / p.client_every)
        await self._heal_and_want()

    def _fault(self, m: Machine) -> None:
        p, rng = self.params, self.rng
        kind = rng.choice(["partition", "hang", "weather", "crash", "pause"])
        lasts = rng.choice([rng.uniform(0, p.margin), rng.uniform(0, 2 * p.ttl)])
        gw = m.gateway
        if kind == "partition" or kind == "hang":
            self.trace(m.name, f"{kind} for {lasts:.1f} s")
            m.backend.partition(hang=kind == "hang")
            self.loop.call_later(lasts, self._heal, m)
        elif kind == "weather":
            m.backend.weather = Weather(delay=rng.uniform(0, p.storage_timeout * 1.5),
                                        lost=rng.uniform(0, 0.5))
            self.trace(m.name, f"slow network {m.backend.weather} for {lasts:.1f} s")
            self.loop.call_later(lasts, self._heal, m)
        elif kind == "crash" and gw is not None:
            self.crash(m)
            self.loop.call_later(rng.uniform(0, p.ttl), self._restart, m)
        elif kind == "pause" and gw is not None and not self.loop.paused(gw.owner):
            lasts = rng.uniform(0, p.pause_max)
            self.trace(m.name, f"pauses for {lasts:.1f} s")
            self.loop.pause(gw.owner)
            self.monitor.pause(gw.owner, self.loop.time() + lasts)
            self.loop.call_later(lasts, self._resume, gw)

    def _heal(self, m: Machine) -> None:
        m.backend.heal()
        m.backend.weather = Weather()
        self.trace(m.name, "network healed")

    def _restart(self, m: Machine) -> None:
        if m.gateway is None and self.loop.time() < self.params.faults_for:
            self.boot(m)

    def _resume(self, gw: Gateway) -> None:
        if gw.alive:
            self.loop.resume(gw.owner)
            self.trace(gw.name, "resumes")

    async def _heal_and_want(self) -> None:
        """Every fault ends; each database is then wanted by one live gateway (restarted or
        not, a crashed one is not), which must be serving it within the liveness bound."""
        p, rng = self.params, self.rng
        for m in self.machines:
            self._heal(m)
            if m.gateway is not None:
                self._resume(m.gateway)
            elif rng.random() < 0.5:
                self.boot(m)
        live = [m for m in self.machines if m.gateway is not None] or [self.machines[0]]
        if live[0].gateway is None:
            self.boot(live[0])
        healed = self.loop.time()
        wanted = {db: rng.choice(live).gateway for db in self.dbs}
        self.trace("sim", "healed: " + ", ".join(f"{db} wanted by {g.name}" for db, g in wanted.items()))
        end = healed + p.liveness_bound() + 1
        for db, gw in wanted.items():
            self.loop.spawn(gw.owner, gw.client(db, end, end))
        await asyncio.sleep(p.liveness_bound())
        for db, gw in wanted.items():
            inst = gw.instances.get(db)
            if inst is None or inst.stopping:
                self.monitor.violate(f"{db} wanted by {gw.name} since t={healed:.0f} is not served "
                                     f"{p.liveness_bound():.0f} s after the faults ended; "
                                     f"{self._lease_of(db)}")


    def _lease_of(self, db: str) -> str:
        lease = self.store.objects.get(f"dbs/{db}/lease.json")
        if lease is None:
            return "its lease is free"
        holder = json.loads(lease[0]).get("holder")
        m = next((m for m in self.machines if m.name == holder), None)
        gw = m and m.gateway
        if gw is None:
            return f"its lease names {holder}, not running"
        return (f"its lease names {holder} ({gw.owner}: held {sorted(gw.leases.held)}, "
                f"unreleased {sorted(gw.leases._unreleased)}, running {sorted(gw.instances)}, "
                f"unsaved {sorted(m.unsaved)})")


@dataclass
class Outcome:
    seed: int
    violations: list[str]
    trace: list[str]
    params: Params = Params()
    leases_class: type[Leases] = Leases

    def report(self) -> str:
        changed = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(Params)
                   if getattr(self.params, f.name) != getattr(Params(), f.name)}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        replay = f"PGSNI_SIM_SEED={self.seed}" if not changed and self.leases_class is Leases else \
            f"leasesim.run({self.seed}, Params({args}), {self.leases_class.__name__})"
        return (f"seed {self.seed} (replay: {replay}): "
                + "; ".join(self.violations[:3]) + "\nlast events:\n" + "\n".join(self.trace))


def run(seed: int, params: Params = Params(), leases_class: type[Leases] = Leases) -> Outcome:
    return Simulation(seed, params, leases_class).run()
