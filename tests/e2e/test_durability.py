"""Continuous durability in the gateway (durability=async, gateway/compute/durability.py): what
a running database has committed is in storage within rpo_seconds, `db info` and the metrics
say how far storage is behind, a second gateway whose copy is older replays the stored WAL, and
a clean stop and start replays nothing."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import time

import psycopg
import pytest

from gateway.compute import durability, walrestore
from gateway.compute.postgres import PostgresError
from gateway.ops.operations import Ops
from storage.wal import parse_lsn

from ..conftest import reachable_tmpdir, seed_template
from ..support.adminclient import AdminClient
from ..support.harness import conninfo, wait_until
from ..support.ports import free_port
from .test_cli import cli  # noqa: F401  (fixture)

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


def _stored_empty(gt, tls, db_id: str) -> str:
    """Create `db_id` and stop it: its first version, before any row. Returns its dsn."""
    gt.create_db(db_id)
    gt.call(lambda: gt.gw.instances.stop(db_id))
    return conninfo(gt.port, tls["ca"], db_id)


@pytest.fixture
def other_root(template_pgdata):
    root = reachable_tmpdir("pgsni-data-")
    seed_template(root, template_pgdata)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_second_gateway_replays_what_the_first_shipped(start_gateway, tls, data_root, other_root):
    a = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    dsn_a = _stored_empty(a, tls, "dur")
    with psycopg.connect(dsn_a, autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 100)")
    wal = _until_stored(a, "dur")
    assert wal["upload_errors"] == 0 and wal["timeline"] == 1
    assert durability.lag(a.gw.instances.instances.values()) == (0, 0.0)
    assert "pgsni_wal_lag_bytes 0.0" in a.gw.metrics.render()[0].decode()
    restorable = _info(a, "dur").restorable  # what db info says a restore can reach
    assert restorable["rpo_seconds"] == 0.0 and restorable["from"] <= restorable["to"]

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


def test_db_info_never_calls_storage_caught_up_on_a_stale_position(start_gateway, tls):
    # the instance's position was asked every rpo_seconds / 2: right after a commit, db info
    # (and the tests' "all stored" wait) read a lag of 0 from before it (CI lost rows that way)
    gt = start_gateway(lease_seconds=0, rpo_seconds=30)
    with psycopg.connect(_stored_empty(gt, tls, "fresh"), autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 1000)")
        (flushed,), = conn.execute("select pg_current_wal_flush_lsn()::text").fetchall()
    wal = _info(gt, "fresh").wal
    behind = parse_lsn(flushed) - parse_lsn(wal["stored_lsn"] or "0/0")
    assert behind <= 0 or wal["lag_bytes"] >= behind, wal


def test_restore_to_a_time_gives_exactly_what_was_committed_before(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    gw = gt.gw
    ops = Ops(gw.settings, gw.catalog, gw.databases, gw.instances)
    dsn = _stored_empty(gt, tls, "pitr")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 10)")
        time.sleep(0.3)
        (target,), = conn.execute("select clock_timestamp()").fetchall()
        time.sleep(0.3)
        conn.execute("insert into t select generate_series(11, 20)")
    _until_stored(gt, "pitr")
    before = gw.databases.state("pitr").version

    # a time no stored commit comes after: Postgres's replay runs out of WAL first; refused
    from gateway.ops.results import OperationError
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    with pytest.raises(OperationError, match="ends before the restore target") as e:
        gt.call(lambda: ops.restore("pitr", time=later, force=True))
    assert e.value.kind == "invalid"
    restored = gt.call(lambda: ops.restore("pitr", time=target, force=True))
    assert restored.base == before and restored.version != before and restored.time
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*), max(x) from t").fetchone() == (10, 10)
    assert gw.databases.state("pitr").version == restored.version  # stored as the current version

    with pytest.raises(OperationError, match="no version saved before"):
        gt.call(lambda: ops.restore("pitr", time=target.replace(year=2000), force=True))


def test_restore_to_an_lsn_keeps_the_writes_up_to_it(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5, admin_port=free_port(), admin_token="t0k")
    admin = AdminClient(gt.settings.admin_port, "t0k")
    gw = gt.gw
    dsn = _stored_empty(gt, tls, "lsn")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 10)")
        (lsn,), = conn.execute("select pg_current_wal_insert_lsn()::text").fetchall()
        conn.execute("insert into t select generate_series(11, 20)")
    _until_stored(gt, "lsn")

    def restore(body: dict):
        return admin.post("/v1/databases/lsn/restore?force=true", body)

    for body, says in (({"lsn": "12345"}, "not an LSN"), ({"lsn": "0/1/2"}, "not an LSN"),
                       ({"lsn": lsn, "time": "2026-12-03T12:00:00Z"}, "one of"),
                       ({"lsn": "0/1"}, "before the WAL storage holds")):
        r = restore(body)
        assert (r.status, r.json()["error"]) == (400, "invalid") and says in r.json()["message"], r.json()
    # past what storage holds: found out once the database is stopped (its last WAL shipped);
    # the local copy goes, the current version stays
    r = restore({"lsn": "F/0"})
    assert r.status == 400 and "beyond the WAL in storage" in r.json()["message"], r.json()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*) from t").fetchone()[0] == 20

    r = restore({"lsn": lsn})
    assert r.status == 200, r.json()
    assert r.json()["lsn"] == lsn and r.json()["base"] != r.json()["version"]
    restored_from = r.json()["base"]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*), max(x) from t").fetchone() == (10, 10)
    # not stored yet and the database stopped: refused before anything stops or downloads
    gt.call(lambda: gw.instances.stop("lsn"))
    r = restore({"lsn": "F/0"})
    assert r.status == 400 and "beyond the WAL storage holds" in r.json()["message"], r.json()

    # once more: the newer versions' stored WAL begins in the same segment, but their own
    # checkpoints come after the LSN, so the first version is what it is replayed onto again
    first = restored_from
    r = restore({"lsn": lsn})
    assert r.status == 200 and r.json()["base"] == first, r.json()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*), max(x) from t").fetchone() == (10, 10)


class _Writer(threading.Thread):
    """Inserts 1, 2, 3, ... in autocommit until stopped, each under `lock` (so that a moment
    taken under it lies between two commits)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="writer", daemon=True)
        self.dsn, self.lock, self.stop, self.n = dsn, threading.Lock(), threading.Event(), 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    with self.lock:
                        conn.execute("insert into t values (%s)", (self.n + 1,))
                        self.n += 1
                    time.sleep(0.005)
        except Exception as e:  # the test asserts there was none
            self.error = e


def test_fork_at_a_time_or_an_lsn_while_the_source_keeps_writing(start_gateway, tls):
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5, admin_port=free_port(), admin_token="t0k")
    gw = gt.gw
    ops = Ops(gw.settings, gw.catalog, gw.databases, gw.instances)
    dsn = _stored_empty(gt, tls, "src")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(x int primary key)")
    writer = _Writer(dsn)
    writer.start()
    with psycopg.connect(dsn, autocommit=True) as watch:
        time.sleep(1.0)
        with writer.lock:  # between two commits
            at_time = dt.datetime.now(dt.timezone.utc)
            before_time = writer.n
        time.sleep(0.5)
        with writer.lock:
            (at_lsn,), = watch.execute("select pg_current_wal_insert_lsn()::text").fetchall()
            before_lsn = writer.n
        time.sleep(0.5)
        (later,), = watch.execute("select pg_current_wal_flush_lsn()::text").fetchall()
    wait_until(lambda: (wal := _info(gt, "src").wal) and wal["stored_lsn"] and
               parse_lsn(wal["stored_lsn"]) >= parse_lsn(later), 10, "the WAL after both points in storage")
    source = gw.instances.instances["src"]

    forked = gt.call(lambda: ops.fork("src", "at-time", time=at_time))
    assert forked.time == at_time.isoformat() and forked.source_version == gw.databases.state("src").version
    r = AdminClient(gt.settings.admin_port, "t0k").post("/v1/databases/src/fork", {"id": "at-lsn", "lsn": at_lsn})
    assert r.status == 201 and r.json()["lsn"] == at_lsn, r.json()
    time.sleep(0.3)
    writer.stop.set()
    writer.join(10)
    assert writer.error is None and writer.n > before_lsn > before_time > 0
    assert gw.instances.instances.get("src") is source  # the source ran on throughout

    def rows(db_id: str) -> list[int]:
        with psycopg.connect(conninfo(gt.port, tls["ca"], db_id)) as conn:
            return [x for x, in conn.execute("select x from t order by x")]
    assert rows("at-time") == list(range(1, before_time + 1))
    assert rows("at-lsn") == list(range(1, before_lsn + 1))
    assert rows("src") == list(range(1, writer.n + 1))
    # each runs on its own
    with psycopg.connect(conninfo(gt.port, tls["ca"], "at-time"), autocommit=True) as conn:
        conn.execute("insert into t values (-1)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into t values (-2)")
        assert conn.execute("select count(*) from t where x = -1").fetchone()[0] == 0
    assert rows("at-time")[0] == -1 and rows("at-lsn")[0] == 1 and rows("src")[0] == -2

    from gateway.ops.results import OperationError
    with pytest.raises(OperationError, match="already exists"):
        gt.call(lambda: ops.fork("src", "at-lsn", lsn=at_lsn))
    with pytest.raises(OperationError, match="at most one"):
        gt.call(lambda: ops.fork("src", "x", version=forked.source_version, lsn=at_lsn))


def test_cli_restores_and_forks_at_an_lsn(start_gateway, tls, cli):  # noqa: F811
    gt = start_gateway(lease_seconds=0, rpo_seconds=0.5)
    with psycopg.connect(_stored_empty(gt, tls, "cl"), autocommit=True) as conn:
        conn.execute("create table t(x int)")
        conn.execute("insert into t select generate_series(1, 5)")
        (lsn,), = conn.execute("select pg_current_wal_lsn()::text").fetchall()
        conn.execute("insert into t select generate_series(6, 9)")
    _until_stored(gt, "cl")
    gt.stop()  # the CLI works on databases no gateway has open

    out = cli("db", "restore", "cl", "--lsn", lsn, "--time", "2026-12-03T12:00:00+00:00")
    assert out.returncode == 2 and "one of --version, --time and --lsn" in out.stderr
    out = cli("db", "restore", "cl", "--lsn", "16B3748")
    assert out.returncode == 1 and "is not an LSN" in out.stderr
    out = cli("--json", "db", "fork", "cl", "cl-then", "--lsn", lsn)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lsn"] == lsn
    out = cli("--json", "db", "restore", "cl", "--lsn", lsn)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lsn"] == lsn

    gt = start_gateway(lease_seconds=0)
    for db_id in ("cl", "cl-then"):
        with psycopg.connect(conninfo(gt.port, tls["ca"], db_id)) as conn:
            assert conn.execute("select count(*), max(x) from t").fetchone() == (5, 5), db_id
