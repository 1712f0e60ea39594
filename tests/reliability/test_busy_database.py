"""A database that never goes idle (durability=async, issue 16): one client commits without
pause for DURATION seconds through a gateway on moto (S3), with an idle timeout far shorter
than that, so the database never stops and never gets a stop-time snapshot. Its restorable
point is then its first version plus the WAL shipped since, and it must keep up: every
SAMPLE seconds the newest WAL in the bucket (listed through the shipper's own WalStore, not
read from its counters) must cover every commit acknowledged more than rpo_seconds + MARGIN
before. At the end that point is restored, as a fork at the LSN of a covered commit while
the writer goes on, and holds exactly the rows up to that commit.

DURATION is 10 minutes in the suite (it takes one xdist worker that long); set
PGSNI_BUSY_SECONDS for a shorter local run."""

from __future__ import annotations

import bisect
import os
import statistics
import threading
import time

import psycopg
import pytest

from gateway.ops.operations import Ops
from storage.wal import format_lsn, parse_lsn

from ..support.harness import conninfo

DURATION = float(os.environ.get("PGSNI_BUSY_SECONDS", "600"))
SAMPLE = 1.5  # seconds between two looks at storage
RPO = 1.0
MARGIN = 2.0  # one partial upload (compress and PUT of up to 16 MiB) on two busy cores, plus the listing
IDLE = 5.0  # the idle timeout: a database that stopped would show as a second start
pytestmark = [pytest.mark.slow, pytest.mark.longest, pytest.mark.timeout(DURATION + 300)]


class Writer(threading.Thread):
    """Inserts 1, 2, 3, ... in autocommit, about 150 a second; after each commit returns,
    records when and the instance's flushed WAL position then (at or past the end of that
    commit's record)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="busy-writer", daemon=True)
        self.dsn, self.stop = dsn, threading.Event()
        self.acked: list[float] = []  # monotonic time commit n+1 returned
        self.lsns: list[int] = []  # the flushed WAL position just after
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    conn.execute("insert into t values (%s, repeat('x', 200))", (len(self.acked) + 1,))
                    at = time.monotonic()
                    (lsn,), = conn.execute("select pg_current_wal_flush_lsn()::text").fetchall()
                    self.lsns.append(parse_lsn(lsn))
                    self.acked.append(at)  # appended last: readers see complete pairs
                    time.sleep(0.005)  # busy, not flat out: the suite shares two cores
        except BaseException as e:  # noqa: BLE001  (the test reports it)
            self.error = e


def uncovered_since(writer: Writer, stored: int, now: float) -> float:
    """How long ago the oldest acknowledged commit storage does not hold yet was acknowledged
    (0 if it holds them all)."""
    n = len(writer.acked)
    first = bisect.bisect_right(writer.lsns, stored, hi=n)  # the LSNs only grow
    return now - writer.acked[first] if first < n else 0.0


def test_a_database_that_never_goes_idle_stays_within_the_rpo(start_gateway, tls, s3_settings):
    gt = start_gateway(**s3_settings, rpo_seconds=RPO, idle_timeout=IDLE, lease_seconds=0)
    gw = gt.gw
    gt.create_db("busy")
    gt.call(lambda: gw.instances.stop("busy"))  # its first version: the only one while it runs
    dsn = conninfo(gt.port, tls["ca"], "busy")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table t(id int primary key, pad text)")
    writer = Writer(dsn)
    writer.start()
    time.sleep(1.0)
    inst = gw.instances.instances["busy"]
    starts = gw.instances.starts
    lags: list[float] = []
    worst = (0.0, 0, 0)  # (lag, stored LSN, commits acknowledged) at the worst sample
    began = time.monotonic()
    try:
        while time.monotonic() - began < DURATION:
            assert writer.error is None, writer.error
            assert gw.instances.instances.get("busy") is inst and inst.shipper is not None, \
                "the busy database was stopped or restarted"
            store = inst.shipper.store
            now = time.monotonic()
            newest = gt.call(store.newest)  # the bucket itself
            lag = uncovered_since(writer, newest[1] if newest else 0, now)
            lags.append(lag)
            if lag >= worst[0]:
                worst = (lag, newest[1] if newest else 0, len(writer.acked))
            assert lag <= RPO + MARGIN, (
                f"after {now - began:.0f} s storage holds WAL up to {format_lsn(worst[1])}, and a commit "
                f"acknowledged {lag:.2f} s ago is not in it (bound {RPO + MARGIN} s)")
            time.sleep(max(0.0, SAMPLE - (time.monotonic() - now)))
        assert gw.instances.starts == starts and gw.instances.instances.get("busy") is inst

        # the restorable point is restorable: a fork at the LSN of a commit storage holds,
        # made while the writer goes on, has exactly the rows up to that commit
        now = time.monotonic()
        covered = bisect.bisect_left(writer.lsns, newest[1], hi=len(writer.acked)) - 1  # its record is stored
        lsn = writer.lsns[covered]
        ops = Ops(gw.settings, gw.catalog, gw.databases, gw.instances)
        forked = gt.call(lambda: ops.fork("busy", "busy-then", lsn=format_lsn(lsn)), timeout=600)
        fork_seconds = time.monotonic() - now
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    with psycopg.connect(conninfo(gt.port, tls["ca"], "busy-then")) as conn:
        assert conn.execute("select count(*), max(id) from t").fetchone() == (covered + 1, covered + 1)
    print(f"\nRELIABILITY busy database: {DURATION:.0f} s, {len(writer.acked)} commits, "
          f"{len(lags)} samples of the bucket; oldest commit not yet in storage: worst "
          f"{worst[0]:.2f} s (at {worst[2]} commits, stored up to {format_lsn(worst[1])}), median "
          f"{statistics.median(lags):.2f} s, bound {RPO + MARGIN:.1f} s; fork at "
          f"LSN {forked.lsn} ({covered + 1} rows, from version {forked.source_version} and its "
          f"WAL) in {fork_seconds:.1f} s")
