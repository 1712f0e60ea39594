"""gateway/compute/cgroups.py against fake cgroup trees (directories with the files the kernel would
have): which files get which values on v1 and v2, the v2 hand-over of the gateway's own
cgroup, and a tree that cannot be written turning the limits off with one log line."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from gateway.compute import cgroups
from gateway.compute.cgroups import Cgroups, Limits

LIMITS = Limits(memory_mb=256, cpu_weight=50, max_pids=64)


def _v1(tmp_path: Path) -> tuple[Path, Path]:
    """A v1 machine: memory, cpu+cpuacct and pids mounted apart; the gateway in /svc."""
    proc = tmp_path / "proc"
    proc.mkdir()
    mounts = {"memory": "memory", "cpu,cpuacct": "cpu,cpuacct", "pids": "pids"}
    lines = []
    for i, (opts, name) in enumerate(mounts.items()):
        mount = tmp_path / "cg" / name
        (mount / "svc").mkdir(parents=True)
        lines.append(f"{30 + i} 25 0:{40 + i} / {mount} rw,nosuid - cgroup cgroup rw,{opts}")
    (proc / "mountinfo").write_text("\n".join(lines) + "\n22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    (proc / "cgroup").write_text("4:memory:/svc\n2:cpu,cpuacct:/svc\n8:pids:/svc\n0::/\n")
    return tmp_path / "cg", proc


def test_v1_writes_each_limit_in_its_own_tree(tmp_path):
    root, proc = _v1(tmp_path)
    found = Cgroups.setup(LIMITS, root=tmp_path / "nowhere", proc=proc)
    assert found is not None and found.version == 1
    group = found.group("app1")
    group.create()
    memory = root / "memory" / "svc" / "pgsni-instances" / "app1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(256 << 20)  # no swap escape
    assert (root / "cpu,cpuacct" / "svc" / "pgsni-instances" / "app1" / "cpu.shares").read_text() == "512"
    assert (root / "pids" / "svc" / "pgsni-instances" / "app1" / "pids.max").read_text() == "64"
    group.add(4242)
    assert (memory / "cgroup.procs").read_text() == "4242"


def test_v2_hands_controllers_down_and_moves_the_gateway_out_of_the_way(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    own = root / "svc"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids io\n")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/svc\n")
    busy = {"first": True}
    real_write = cgroups._write

    def write(path, value, optional=False):
        # the kernel's "no internal processes" rule: refused once while the gateway is in /svc
        if path == own / "cgroup.subtree_control" and busy.pop("first", False):
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_write(path, value, optional)

    monkeypatch.setattr(cgroups, "_write", write)
    found = Cgroups.setup(LIMITS, root=root, proc=proc)
    assert found is not None and found.version == 2
    assert (own / "pgsni-gateway" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    base = own / "pgsni-instances"
    assert (base / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    found.group("app1").create()
    assert (base / "app1" / "memory.max").read_text() == str(256 << 20)
    assert (base / "app1" / "memory.swap.max").read_text() == "0"
    assert (base / "app1" / "cpu.weight").read_text() == "50"
    assert (base / "app1" / "pids.max").read_text() == "64"


def test_no_limits_set_up_nothing(tmp_path):
    assert Cgroups.setup(Limits(), root=tmp_path, proc=tmp_path) is None


def test_a_tree_that_cannot_be_written_turns_limits_off_with_one_line(tmp_path, caplog):
    root, proc = _v1(tmp_path)
    (root / "memory" / "svc").rmdir()
    (root / "memory" / "svc").write_text("not a directory")  # as good as read-only, even for root
    with caplog.at_level(logging.WARNING, logger="pgsni.cgroups"):
        assert Cgroups.setup(Limits(memory_mb=256), root=tmp_path / "nowhere", proc=proc) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "resource limits per instance are off" in lines[0]


def test_a_missing_controller_is_said_and_the_others_still_apply(tmp_path, caplog):
    root, proc = _v1(tmp_path)
    (proc / "mountinfo").write_text((proc / "mountinfo").read_text().replace("rw,pids", "rw,freezer"))
    with caplog.at_level(logging.WARNING, logger="pgsni.cgroups"):
        found = Cgroups.setup(LIMITS, root=tmp_path / "nowhere", proc=proc)
    assert found is not None and set(found.dirs) == {"memory", "cpu"}
    assert any("no pids controller" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw, problem", [({"instance_cpu_weight": 20000}, "1-10000"),
                                         ({"instance_memory_mb": 16}, "at least 64"),
                                         ({"instance_max_pids": 3}, "at least 8"),
                                         ({"instance_memory_mb": -1}, "0 \\(off\\) or positive")])
def test_limit_settings_are_checked(kw, problem, tmp_path):
    from gateway.config import ConfigError, Settings

    with pytest.raises(ConfigError, match=problem):
        Settings(data_root=str(tmp_path), **kw)
