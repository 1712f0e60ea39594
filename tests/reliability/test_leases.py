"""Two gateways sharing one storage never run the same database at once (storage/leases.py):
the second is refused with 57P03 while the first holds it, and takes over once it stops."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from gateway.config import Settings
from storage.localdir import LocalDirBackend

from ..conftest import reachable_tmpdir, seed_template
from ..support.harness import GatewayThread, conninfo, connect_sqlstate, psql, wait_until


@pytest.fixture
def second_gateway(make_settings, template_pgdata):
    """A gateway with its own data root, sharing the first one's storage."""
    root = reachable_tmpdir("pgsni-data-b-")
    seed_template(root, template_pgdata)
    started: list[GatewayThread] = []

    def start(**kw) -> GatewayThread:
        base = make_settings(**kw)
        settings = Settings(**{**base.__dict__, "data_root": str(root),
                               "socket_dir": f"/tmp/pgsni-s-{root.name[-8:]}"})
        gt = GatewayThread(settings).start()
        started.append(gt)
        return gt

    yield start
    for gt in started:
        gt.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_a_database_runs_on_one_gateway_at_a_time(start_gateway, second_gateway, tls):
    a = start_gateway(lease_seconds=3)
    b = second_gateway(lease_seconds=3)
    assert a.gw.instances.leases.holder != b.gw.instances.leases.holder
    a.create_db("shared")
    assert psql(conninfo(a.port, tls["ca"], "shared"), "create table t(x int); insert into t values (1)").returncode == 0
    a.call(lambda: a.gw.instances.stop("shared", "test"))  # now in storage, so b knows it
    assert psql(conninfo(a.port, tls["ca"], "shared"), "select 1").returncode == 0  # a holds it again

    assert connect_sqlstate(b.port, tls["ca"], "shared") == "57P03"
    assert "shared" not in b.running()

    a.call(lambda: a.gw.instances.stop("shared", "test"))  # saves, then gives the lease up
    lease = Path(a.settings.storage_path) / "dbs" / "shared" / "lease.json"

    def free() -> bool:
        return json.loads(lease.read_bytes()).get("holder") is None

    # at once, not lease_seconds later
    wait_until(free, what="a's lease released", timeout=2)
    out = psql(conninfo(b.port, tls["ca"], "shared"), "select count(*) from t")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"  # b restored a's saved copy
    assert psql(conninfo(b.port, tls["ca"], "shared"), "insert into t values (2)").returncode == 0
    assert connect_sqlstate(a.port, tls["ca"], "shared") == "57P03"

    b.call(lambda: b.gw.instances.stop("shared", "test"))
    wait_until(free, what="b's lease released", timeout=2)
    out = psql(conninfo(a.port, tls["ca"], "shared"), "select count(*) from t")
    assert out.stdout.strip() == "2", "a must restore b's newer version, not reuse its stale copy"


def test_a_restarted_gateway_reopens_its_own_databases_at_once(start_gateway, tls):
    a = start_gateway()
    a.create_db("mine")
    holder = a.gw.instances.leases.holder
    storage = a.settings.storage_path
    a.stop()
    # what a gateway killed with SIGKILL leaves behind: its lease and a live-looking heartbeat
    backend = LocalDirBackend(Path(storage))
    asyncio.run(backend.put("dbs/mine/lease.json", json.dumps({"holder": holder}).encode()))
    asyncio.run(backend.put(f"gateways/{holder}.json",
                            json.dumps({"holder": holder, "expires": time.time() + 3600}).encode()))
    b = start_gateway()  # same data root: the same holder name, so no wait for expiry
    assert b.gw.instances.leases.holder == holder
    assert psql(conninfo(b.port, tls["ca"], "mine"), "select 1").stdout.strip() == "1"


def test_a_restarted_gateway_gives_up_the_leases_a_crash_left(start_gateway, second_gateway, tls):
    """Found by the lease simulation (seed 295): a gateway killed between a claim and its
    release (here: after the save, before the release) left a lease naming it, which the
    restarted gateway, heartbeating for its other databases, never gave up, so no other
    gateway could ever run that database. The claim marks the lease in the data root first;
    the restart gives up what is marked and has nothing to save."""
    a = start_gateway(lease_seconds=3)
    a.create_db("left")
    marks = Path(a.settings.data_root) / ".leases"
    assert (marks / "left").exists()  # marked while the lease names a
    a.call(lambda: a.gw.instances.stop("left", "test"))  # saved and given up: no mark left
    wait_until(lambda: not (marks / "left").exists(), what="the mark removed with the release", timeout=2)
    holder = a.gw.instances.leases.holder
    a.create_db("other")  # a holds another database: its heartbeat goes on after the restart
    a.stop()
    # what a kill after the save of "left" and before its release leaves behind
    backend = LocalDirBackend(Path(a.settings.storage_path))
    asyncio.run(backend.put("dbs/left/lease.json", json.dumps({"holder": holder}).encode()))
    (marks / "left").touch()
    a = start_gateway(lease_seconds=3)
    a.call(lambda: a.gw.instances.acquire("other"))  # heartbeating for it
    b = second_gateway(lease_seconds=3)
    wait_until(lambda: not (marks / "left").exists(), what="the lease a crash left given up", timeout=5)
    out = psql(conninfo(b.port, tls["ca"], "left"), "select 1")
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


def test_without_leases_a_stale_copy_is_set_aside_not_saved_over(start_gateway, second_gateway, tls):
    """lease_seconds=0 (one gateway per bucket) broken by running two: the copy that lost the
    race is moved aside for the operator; storage keeps the other's version; nothing is lost."""
    a = start_gateway(lease_seconds=0)
    b = second_gateway(lease_seconds=0)
    a.create_db("race")
    assert psql(conninfo(a.port, tls["ca"], "race"), "create table t(x int); insert into t values (1)").returncode == 0
    a.call(lambda: a.gw.instances.stop("race", "test"))
    assert psql(conninfo(b.port, tls["ca"], "race"), "insert into t values (2)").returncode == 0
    b.call(lambda: b.gw.instances.stop("race", "test"))
    # a's copy is stale (it never learns of b's version without leases) and gets a write
    assert psql(conninfo(a.port, tls["ca"], "race"), "insert into t values (3)").returncode == 0
    a.call(lambda: a.gw.instances.stop("race", "test"))

    root = Path(a.settings.data_root)
    kept = list(root.glob(".conflict-race-*"))
    assert len(kept) == 1 and (kept[0] / "pgdata" / "PG_VERSION").is_file()
    out = psql(conninfo(a.port, tls["ca"], "race"), "select string_agg(x::text, ',' order by x) from t")
    assert out.stdout.strip() == "1,2", "storage must still hold b's version"


def test_a_shutdown_longer_than_the_lease_still_saves_and_releases(start_gateway, tls):
    """A fast shutdown may take up to stop_timeout (30 s by default), more than the heartbeat
    stays valid after its last renewal (ttl - margin, minus up to ttl/3). The heartbeat is
    renewed until every instance has stopped, so the shutdown saves and gives the leases up
    (another gateway takes over at once) instead of refusing to save a lapsed database."""
    ttl = 3.0  # valid 2.5 s after a renewal
    gw = start_gateway(lease_seconds=ttl, durability="snapshot")
    gw.create_db("slowstop")
    assert psql(conninfo(gw.port, tls["ca"], "slowstop"), "create table t(x int)").returncode == 0
    launcher = gw.gw.instances.launcher
    halt = launcher.halt

    async def slow_halt(inst, **kw):  # a fast shutdown that takes longer than the lease lasts
        await asyncio.sleep(ttl)
        await halt(inst, **kw)

    launcher.halt = slow_halt
    gw.stop()
    assert not gw.gw.databases.state("slowstop").dirty, "the shutdown saved nothing"
    lease = Path(gw.settings.storage_path) / "dbs" / "slowstop" / "lease.json"
    assert json.loads(lease.read_bytes()).get("holder") is None, "the lease was not given up"
