"""Storage cut for 30 s under write load with durability=async (issue 16): clients see no
error, the WAL lag grows while storage is away, then catches up, and nothing acknowledged is
lost: a second gateway with an empty data root, on the same bucket, finds every row."""

from __future__ import annotations

import shutil
import threading
import time

import psycopg
import pytest

from gateway.compute import durability
from storage.wal import parse_lsn

from ..conftest import reachable_tmpdir, seed_template
from ..support.harness import conninfo

OUTAGE = 30.0
pytestmark = pytest.mark.slow


def _wal(gt, db_id: str) -> dict:
    """What db info shows of the running instance's WAL shipping (without asking storage,
    which db info otherwise does)."""
    return gt.call(lambda: durability.shipping(gt.gw.instances.instances[db_id]))


def test_storage_cut_under_write_load_loses_nothing(start_gateway, tls, s3_settings, s3_proxy, template_pgdata):
    gt = start_gateway(**s3_settings, rpo_seconds=1.0)
    gt.create_db("cut")
    gt.call(lambda: gt.gw.instances.stop("cut"))  # its first version
    dsn = conninfo(gt.port, tls["ca"], "cut")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(id int primary key, pad text)")
    acked: list[int] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    conn.execute("insert into t values (%s, repeat('x', 200))", (n,))
                    acked.append(n)
                    time.sleep(0.005)
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            failed.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(2.0)
        s3_proxy.cut()
        time.sleep(OUTAGE)
        during = _wal(gt, "cut")
        s3_proxy.restore()
        # caught up: storage holds all the WAL flushed when storage came back (writes go on,
        # so the lag itself is rarely 0 at the moment it is asked)
        backlog = _wal(gt, "cut")
        target = parse_lsn(backlog["stored_lsn"] or "0/0") + backlog["lag_bytes"]
        deadline = time.monotonic() + 60
        while parse_lsn((wal := _wal(gt, "cut"))["stored_lsn"] or "0/0") < target:
            assert time.monotonic() < deadline, f"storage did not catch up: {wal}"
            time.sleep(0.2)
        caught_up = 60 - (deadline - time.monotonic())
    finally:
        stop.set()
        writer.join(30)
    assert not failed, failed  # clients never noticed
    assert during["lag_seconds"] > OUTAGE / 2 and during["lag_bytes"] > 0 and during["upload_errors"] > 0
    time.sleep(2.0)  # the last commits' WAL (rpo_seconds)
    print(f"\nRELIABILITY wal-outage: {len(acked)} commits, lag during the outage "
          f"{during['lag_bytes'] >> 10} KiB / {during['lag_seconds']:.0f} s, caught up in {caught_up:.1f} s")

    # everything acknowledged is in storage: a gateway with nothing local replays it all
    root = reachable_tmpdir("pgsni-data-")
    seed_template(root, template_pgdata)
    try:
        other = start_gateway(**s3_settings, lease_seconds=0, data_root=str(root),
                              socket_dir=f"/tmp/pgsni-s-{root.name[-8:]}")
        with psycopg.connect(conninfo(other.port, tls["ca"], "cut")) as conn:
            found = {r[0] for r in conn.execute("select id from t").fetchall()}
        assert set(acked) <= found, f"{len(set(acked) - found)} acknowledged commits missing"
    finally:
        shutil.rmtree(root, ignore_errors=True)
