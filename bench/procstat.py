"""Process figures straight from /proc (no psutil): CPU seconds, RSS, unique memory (USS) and
the process tree of a pid, plus a sampler thread that records a process's peak RSS."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` (itself, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * _PAGE_KB / 1024


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0])
    return out


def uss_mb(pid: int) -> float:
    """Unique memory: Private_Clean + Private_Dirty from smaps_rollup, in MB."""
    r = _rollup(pid)
    return (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024


def pss_mb(pid: int) -> float:
    return _rollup(pid).get("Pss", 0) / 1024


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            todo += children(p)
        except OSError:
            pass
    return seen


def tree_memory(pid: int) -> dict[str, float]:
    """USS and PSS summed over a process and its descendants (a postmaster and its children)."""
    uss = pss = 0.0
    n = 0
    for p in tree(pid):
        try:
            r = _rollup(p)
        except OSError:
            continue
        uss += (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024
        pss += r.get("Pss", 0) / 1024
        n += 1
    return {"uss_mb": uss, "pss_mb": pss, "processes": n}


def postmaster_of(pgdata: Path) -> int | None:
    """The pid in `pgdata`/postmaster.pid, if that process is alive."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


class Sampler:
    """Samples a pid's RSS every `interval` seconds in a thread; `.peak`, `.samples`."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu0 = 0.0
        self._t0 = 0.0
        self.cpu = 0.0  # cores used on average between start and stop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self._t0, rss_mb(self.pid)))
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._t0 = time.monotonic()
        self._cpu0 = cpu_seconds(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._t0
        self.cpu = (cpu_seconds(self.pid) - self._cpu0) / wall if wall > 0 else 0.0

    @property
    def peak(self) -> float:
        return max((s[1] for s in self.samples), default=0.0)

    @property
    def first(self) -> float:
        return self.samples[0][1] if self.samples else 0.0
