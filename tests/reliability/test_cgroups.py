"""instance_memory_mb on a real machine: each database's Postgres runs in a cgroup of its own;
a query that eats memory in one database ends that backend only (the kernel's OOM killer stays
inside the group, Postgres restarts its backends), while a query in another database at the
same time completes, and the gateway goes on serving both."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from gateway.compute.cgroups import Cgroups, Limits

from ..conftest import PG_OPTIONS
from ..support.harness import conninfo

LIMIT_MB = 256
HOG = "select length(string_agg(repeat('x', 1000000), '')) from generate_series(1, 700)"  # ~700 MB
CALM_ROWS = 20_000_000
CALM = f"select count(*) from generate_series(1, {CALM_ROWS})"  # a few seconds, little memory

pytestmark = pytest.mark.skipif(Cgroups.setup(Limits(memory_mb=LIMIT_MB)) is None,
                                reason="the cgroup tree is not writable here")


@pytest.mark.slow
def test_a_memory_hog_loses_its_own_backend_and_nothing_else(start_gateway, tls):
    gw = start_gateway(instance_memory_mb=LIMIT_MB, instance_max_pids=200,
                       postgres_options={**PG_OPTIONS, "shared_buffers": "32MB"})
    for db in ("hog", "calm"):
        gw.create_db(db)
    dsn = {db: conninfo(gw.port, tls["ca"], db) for db in ("hog", "calm")}
    hog_pid = gw.gw.instances.instances["hog"].process.pid
    assert "pgsni-instances/hog" in Path(f"/proc/{hog_pid}/cgroup").read_text()

    calm: dict[str, object] = {}
    started = threading.Event()

    def run_calm() -> None:
        with psycopg.connect(dsn["calm"]) as conn:
            started.set()
            calm["rows"] = conn.execute(CALM).fetchone()[0]

    thread = threading.Thread(target=run_calm)
    thread.start()
    assert started.wait(30)
    with pytest.raises(psycopg.OperationalError):  # its backend is killed: the connection ends
        with psycopg.connect(dsn["hog"]) as conn:
            conn.execute(HOG)
    thread.join(120)
    assert calm.get("rows") == CALM_ROWS  # the other tenant's query finished, unharmed

    # the kernel did enforce the limit on the hog's group, and nowhere else
    group = _memory_dir(hog_pid)
    assert _ooms(group) > 0, group
    # the gateway is fine, and the hog's database serves again once Postgres has recovered
    with psycopg.connect(dsn["hog"]) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert gw.gw.instances.instances["hog"].process.pid == hog_pid  # the same postmaster


def _memory_dir(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if names == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    raise AssertionError("no memory cgroup")


def _ooms(group: Path) -> int:
    """How many processes the kernel's OOM killer ended inside the group."""
    events = group / ("memory.events" if (group / "memory.events").exists() else "memory.oom_control")
    return int(dict(line.split() for line in events.read_text().splitlines()).get("oom_kill", 0))
