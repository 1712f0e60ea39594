"""What the lease simulation (tests/storage/leasesim.py) checks as it runs, and the trace of
events it prints when a check fails."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ..support.virtual_loop import VirtualTimeLoop

if TYPE_CHECKING:
    from .leasesim import Params


class Trace:
    def __init__(self, loop: VirtualTimeLoop) -> None:
        self.loop, self.events = loop, deque(maxlen=50)

    def __call__(self, who: str, what: str) -> None:
        self.events.append(f"{self.loop.time():9.2f} {who:5} {what}")


class Monitor:
    """The invariants, checked as events happen."""

    def __init__(self, params: Params, loop: VirtualTimeLoop, trace: Trace) -> None:
        self.params, self.loop, self.trace = params, loop, trace
        self.busy: dict[str, dict[str, str]] = {}  # db -> {gateway: "serves" | "saves"}
        self.since: dict[tuple[str, str], float] = {}  # (gateway, db) -> serving since
        self.paused: dict[str, list[list[float]]] = {}  # gateway -> [[from, to]]
        self.violations: list[str] = []
        self.trail: list[str] = []  # the trace at the first violation
        self.over = False  # the run is over: what its cleanup does is not judged

    def violate(self, what: str) -> None:
        if self.over or f"t={self.loop.time():.2f}: {what}" in self.violations[-5:]:
            return  # over, or told already (two checks may see the same lapse)
        self.trace("!!", what)
        if not self.violations:
            self.trail = list(self.trace.events)
        self.violations.append(f"t={self.loop.time():.2f}: {what}")

    def begin(self, gw: str, db: str, doing: str) -> None:
        self.trace(gw, f"{doing} {db}")
        others = {g: d for g, d in self.busy.setdefault(db, {}).items() if g != gw}
        if others:
            self.violate(f"{gw} {doing} {db} while " + ", ".join(f"{g} {d}" for g, d in others.items()))
        self.busy[db][gw] = doing
        if doing == "serves":
            self.since[(gw, db)] = self.loop.time()

    def end(self, gw: str, db: str, why: str) -> None:
        if self.busy.get(db, {}).pop(gw, None) is not None:
            self.trace(gw, f"ends {db} ({why})")
        self.since.pop((gw, db), None)

    def serving(self, gw: str) -> dict[str, float]:
        return {db: t for (g, db), t in self.since.items() if g == gw}

    def pause(self, gw: str, until: float) -> None:
        self.paused.setdefault(gw, []).append([self.loop.time(), until])

    def paused_within(self, gw: str, start: float, end: float) -> float:
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.paused.get(gw, []))

    def fenced_by(self, gw: str, lapse: float, dbs: set[str] | None, check: float) -> None:
        """At `check`: `gw` (whose heartbeat lapsed at `lapse`) serves none of `dbs` (None:
        any) that it served since before the lapse; later if it was paused meanwhile."""
        later = lapse + self.params.fence_bound() + self.paused_within(gw, lapse, check)
        if later > check + 1e-6:
            self.loop.call_at(later, self.fenced_by, gw, lapse, dbs, later)
            return
        for db, since in self.serving(gw).items():
            if since < lapse and (dbs is None or db in dbs):
                self.violate(f"{gw} still serves {db} {check - lapse:.1f} s after its heartbeat "
                             f"lapsed (bound {self.params.fence_bound():.1f} s)")
