"""Resource limits per instance: memory, CPU weight and process count for each database's
Postgres, in a cgroup of its own under the gateway's, so a tenant that exhausts its memory
loses its own backend (the kernel's OOM killer stays inside the group; Postgres restarts the
backends) and not the gateway or another tenant.

cgroup v2 (one unified tree) or v1 (one tree per controller), whichever the machine has.
Where the tree cannot be written (an unprivileged container), the gateway says so in one log
line and runs without limits. Layout: `<gateway's cgroup>/pgsni-instances/<database id>/`;
on v2 the gateway first moves itself into `<its cgroup>/pgsni-gateway/` if its own cgroup
must give up its processes to let controllers reach the instances' groups."""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pgsni.cgroups")

INSTANCES = "pgsni-instances"
GATEWAY_LEAF = "pgsni-gateway"
MEMSW = "memory.memsw.limit_in_bytes"
OPTIONAL = ("memory.swap.max", MEMSW)  # swap accounting is off on many machines


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 0
    cpu_weight: int = 0  # 1-10000; 100 is every group's default share
    max_pids: int = 0

    @property
    def wanted(self) -> tuple[str, ...]:
        """The controllers these limits need."""
        return tuple(c for c, on in (("memory", self.memory_mb), ("cpu", self.cpu_weight),
                                     ("pids", self.max_pids)) if on)

    def files(self, version: int) -> dict[str, list[tuple[str, str]]]:
        """controller -> [(file, value)], in the order they must be written."""
        out: dict[str, list[tuple[str, str]]] = {}
        if self.memory_mb:
            size = str(self.memory_mb << 20)
            # v1: memory+swap may never be below memory alone, so it is lifted first (a group
            # kept from an earlier start may have a lower one), then set to the same size
            out["memory"] = ([("memory.max", size), ("memory.swap.max", "0")] if version == 2 else
                             [(MEMSW, "-1"), ("memory.limit_in_bytes", size), (MEMSW, size)])
        if self.cpu_weight:
            out["cpu"] = ([("cpu.weight", str(self.cpu_weight))] if version == 2 else
                          [("cpu.shares", str(max(2, self.cpu_weight * 1024 // 100)))])
        if self.max_pids:
            out["pids"] = [("pids.max", str(self.max_pids))]
        return out


class Cgroups:
    """The instances' parent group(s): `dirs` maps each controller to its directory (on v2
    all map to the same one)."""

    def __init__(self, version: int, dirs: dict[str, Path], limits: Limits) -> None:
        self.version, self.dirs, self.limits = version, dirs, limits

    @classmethod
    def setup(cls, limits: Limits, *, root: Path = Path("/sys/fs/cgroup"),
              proc: Path = Path("/proc/self")) -> "Cgroups | None":
        """The instances' parent groups, made if need be; None (after one log line) when no
        limit is set or the tree cannot be written."""
        if not limits.wanted:
            return None
        try:
            found = _unified(root, proc, limits) if (root / "cgroup.controllers").is_file() \
                else _per_controller(proc, limits)
        except OSError as e:
            log.warning("resource limits per instance are off: the cgroup tree cannot be written "
                        "here (%s); instances run without instance_memory_mb, instance_cpu_weight "
                        "and instance_max_pids", e.strerror or e)
            return None
        missing = [c for c in limits.wanted if c not in found.dirs]
        if missing:
            log.warning("resource limits per instance: no %s controller here; those limits are off",
                        ", ".join(missing))
        return found if found.dirs else None

    def group(self, name: str) -> "Group":
        return Group(self, name)


class Group:
    """One instance's group (per controller on v1)."""

    def __init__(self, parent: Cgroups, name: str) -> None:
        self.parent, self.name = parent, name
        self.dirs = {c: d / name for c, d in parent.dirs.items()}

    def create(self) -> None:
        """Make the group (or keep the one left by an earlier start) with the current limits."""
        files = self.parent.limits.files(self.parent.version)
        for controller, path in self.dirs.items():
            path.mkdir(exist_ok=True)
            for name, value in files.get(controller, []):
                _write(path / name, value, optional=name in OPTIONAL)

    def add(self, pid: int) -> None:
        for path in set(self.dirs.values()):
            try:
                (path / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass  # it has exited meanwhile

    def adopt(self, root_pid: int) -> None:
        """Add `root_pid`'s descendants too: processes it forked before it was moved in stay in
        the old group (those forked after inherit this one)."""
        for pid in descendants(root_pid):
            self.add(pid)

    def remove(self, wait: float = 2.0) -> None:
        """Remove the group once its processes are gone (a busy one is left for the next start)."""
        deadline = time.monotonic() + wait
        for path in set(self.dirs.values()):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.debug("cgroup %s left in place: %s", path, e.strerror)
                        break
                    time.sleep(0.02)


def descendants(root_pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], {root_pid}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:
            raise


def _own_path(proc: Path, controller: str | None) -> str:
    """The gateway's cgroup path from /proc/self/cgroup: the v2 line (`0::/x`) or the v1 line
    naming `controller`."""
    for line in (proc / "cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller is None and names == "") or (controller and controller in names.split(",")):
            return path
    raise FileNotFoundError(f"no cgroup line for {controller or 'the unified tree'} in {proc / 'cgroup'}")


def _unified(root: Path, proc: Path, limits: Limits) -> Cgroups:
    own = root / _own_path(proc, None).lstrip("/")
    available = (own / "cgroup.controllers").read_text().split()
    wanted = [c for c in limits.wanted if c in available]
    enable = " ".join(f"+{c}" for c in wanted)
    try:
        _write(own / "cgroup.subtree_control", enable)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        # a group with processes cannot hand controllers down (except the root): the gateway
        # moves into a leaf of its own first
        leaf = own / GATEWAY_LEAF
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        _write(own / "cgroup.subtree_control", enable)
    base = own / INSTANCES
    base.mkdir(exist_ok=True)
    _write(base / "cgroup.subtree_control", enable)
    return Cgroups(2, {c: base for c in wanted}, limits)


def _per_controller(proc: Path, limits: Limits) -> Cgroups:
    mounts: dict[str, Path] = {}
    for line in (proc / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) >= 3 and tail[0] == "cgroup":
            for option in tail[2].split(","):
                mounts.setdefault(option, Path(fields[4]))
    dirs = {}
    for controller in limits.wanted:
        if controller in mounts:
            base = mounts[controller] / _own_path(proc, controller).lstrip("/") / INSTANCES
            base.mkdir(exist_ok=True)
            dirs[controller] = base
    return Cgroups(1, dirs, limits)
