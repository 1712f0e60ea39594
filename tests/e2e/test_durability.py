"""Continuous durability in the gateway (durability=async, gateway/compute/durability.py): what
a running database has committed is in storage within rpo_seconds, `db info` and the metrics
say how far storage is behind, a second gateway whose copy is older replays the stored WAL, and
a clean stop and start replays nothing."""

from __future__ import annotations

import shutil
import time

import psycopg
import pytest

from gateway.compute import durability, walrestore
from gateway.compute.postgres import PostgresError
from gateway.ops.operations import Ops

from ..conftest import reachable_tmpdir, seed_template
from ..support.harness import conninfo

pytestmark = pytest.mark.slow


def _info(gt, db_id: str):
    gw = gt.gw
    return gt.call(lambda: Ops(gw.settings, gw.catalog, gw.databases, gw.instances).info(db_id))


def _timeline(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("select timeline_id from pg_control_checkpoint()").fetchone()[0]


def _until_stored(gt, db_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        wal = _info(gt, db_id).wal
        if wal and wal["stored_lsn"] and wal["lag_bytes"] == 0:
            return wal
        assert time.monotonic() < deadline, f"storage still behind: {wal}"
        time.sleep(0.1)


@pytest.fixture
def other_root(template_pgdata):
    root = reachable_tmpdir("pgsni-data-")
    seed_template(root, template_pgdata)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_second_gateway_replays_what_the_first_shipped(start_gateway, tls, data_root, other_root):
    a = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    a.create_db("dur")
    a.call(lambda: a.gw.instances.stop("dur"))  # its first version
    dsn_a = conninfo(a.port, tls["ca"], "dur")
    with psycopg.connect(dsn_a, autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 100)")
    wal = _until_stored(a, "dur")
    assert wal["upload_errors"] == 0 and wal["timeline"] == 1
    assert durability.lag(a.gw.instances.instances.values()) == (0, 0.0)
    assert "pgsni_wal_lag_bytes 0.0" in a.gw.metrics.render()[0].decode()

    # another gateway (its own data root, the same storage) has only the first version: the
    # rows are in the WAL storage holds, which it replays before serving the database
    b = start_gateway(lease_seconds=0, data_root=str(other_root), socket_dir=f"/tmp/pgsni-s-{other_root.name[-8:]}",
                      storage_path=str(data_root / "_storage"))
    dsn_b = conninfo(b.port, tls["ca"], "dur")
    # a replay that fails half-way (the copy already set up for recovery) must not leave that
    # copy to start as it is: it is removed, and the next connection restores and replays afresh
    real_replay = walrestore.replay

    async def failing_replay(*args, **kw):
        raise PostgresError("replay failed (test)")
    walrestore.replay = failing_replay
    try:
        with pytest.raises(psycopg.OperationalError, match="could not be started"):
            psycopg.connect(dsn_b).close()
    finally:
        walrestore.replay = real_replay
    assert not b.gw.catalog.exists("dur")
    with psycopg.connect(dsn_b) as conn:
        assert conn.execute("select count(*) from t").fetchone()[0] == 100
    assert _timeline(dsn_b) == 2  # promoted: the first gateway's later WAL stays off this history
    assert b.gw.databases.state("dur").dirty  # the replayed copy is saved at its stop

    # a clean stop and start of a copy that storage is not ahead of replays nothing
    b.call(lambda: b.gw.instances.stop("dur"))
    with psycopg.connect(dsn_b) as conn:
        assert conn.execute("select count(*) from t").fetchone()[0] == 100
    assert _timeline(dsn_b) == 2  # a second replay would have promoted it to timeline 3


def test_restore_to_a_time_gives_exactly_what_was_committed_before(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    gw = gt.gw
    ops = Ops(gw.settings, gw.catalog, gw.databases, gw.instances)
    gt.create_db("pitr")
    gt.call(lambda: gw.instances.stop("pitr"))  # the version before any row
    dsn = conninfo(gt.port, tls["ca"], "pitr")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 10)")
        time.sleep(0.3)
        (target,), = conn.execute("select clock_timestamp()").fetchall()
        time.sleep(0.3)
        conn.execute("insert into t select generate_series(11, 20)")
    _until_stored(gt, "pitr")
    before = gw.databases.state("pitr").version

    restored = gt.call(lambda: ops.restore("pitr", time=target, force=True))
    assert restored.base == before and restored.version != before and restored.time
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*), max(x) from t").fetchone() == (10, 10)
    assert gw.databases.state("pitr").version == restored.version  # stored as the current version

    from gateway.ops.results import OperationError
    with pytest.raises(OperationError, match="no version saved before"):
        gt.call(lambda: ops.restore("pitr", time=target.replace(year=2000), force=True))
