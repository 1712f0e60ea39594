"""A bucket that is slow rather than down: the TCP proxy in front of the S3 server (moto)
adds latency to every chunk. Below `storage_timeout` a cold connect (restore from storage)
just takes longer; above it the client gets 57P03 in bounded time, and connects normally
once the latency is gone."""

from __future__ import annotations

import shutil
import time

import pytest

from ..support.harness import connect_sqlstate, conninfo, psql, wait_until


def _cold(gw, db_id: str) -> None:
    """Stop the database (saving it) and drop the local copy: the next connect restores."""
    gw.call(lambda: gw.gw.instances.stop(db_id))
    shutil.rmtree(gw.gw.catalog.db_dir(db_id))
    gw.gw.databases.forget(db_id)


@pytest.mark.slow
def test_slow_bucket_below_timeout_works_and_above_it_is_57P03_then_recovers(
        start_gateway, tls, s3_settings, s3_proxy):
    gw = start_gateway(**{**s3_settings, "storage_timeout": 2.0, "storage_attempts": 2})
    gw.create_db("slow")
    dsn = conninfo(gw.port, tls["ca"], "slow")
    assert psql(dsn, "create table t(x int); insert into t values (42)").returncode == 0
    _cold(gw, "slow")

    # 0.3 s each way on every chunk: well below the 2 s per-request timeout
    s3_proxy.delay = 0.3
    started = time.monotonic()
    out = psql(dsn, "select x from t")
    slow_seconds = time.monotonic() - started
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    assert slow_seconds > 0.6  # the latency was really there (at least one round trip)
    _cold(gw, "slow")

    # 3 s per chunk: every request times out; the client hears 57P03, not a hang
    s3_proxy.delay = 3.0
    started = time.monotonic()
    assert connect_sqlstate(gw.port, tls["ca"], "slow") == "57P03"
    refused_seconds = time.monotonic() - started
    assert refused_seconds < 25
    assert "storage holding database" in psql(dsn, "select 1").stderr
    assert not gw.gw.catalog.exists("slow")  # no half-restored copy
    assert "slow" not in gw.running()

    s3_proxy.delay = 0.0
    time.sleep(3.5)  # let chunks already queued behind the old latency drain
    out = psql(dsn, "select x from t")
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    print(f"slow bucket: cold connect {slow_seconds:.1f}s at 0.3 s latency; "
          f"57P03 after {refused_seconds:.1f}s at 3 s latency")


@pytest.mark.slow
def test_a_hanging_store_is_57P03_within_the_handshake_and_the_start_timeout(
        start_gateway, tls, s3_settings, s3_proxy):
    """Storage that accepts connections and never answers, with a retry budget (4 × 10 s)
    far longer than the client's patience: whatever step waits on it, the client hears 57P03
    naming storage, within the handshake (roles of a database not on this machine) or within
    start_timeout (the lease and the restore of a woken one), never a timeout blamed on it."""
    gw = start_gateway(**{**s3_settings, "storage_timeout": 10.0, "storage_attempts": 4,
                          "handshake_timeout": 4.0, "start_timeout": 6.0})
    gw.create_db("hang")
    dsn = conninfo(gw.port, tls["ca"], "hang")
    _cold(gw, "hang")
    s3_proxy.delay = 3600.0
    started = time.monotonic()
    assert connect_sqlstate(gw.port, tls["ca"], "hang") == "57P03"
    assert time.monotonic() - started < 4.0 + 1.0
    assert "storage did not answer in time" in psql(dsn, "select 1").stderr

    s3_proxy.delay = 0.0
    assert psql(dsn, "select 1").returncode == 0  # restored here; stopping gives the lease up
    gw.call(lambda: gw.gw.instances.stop("hang"))
    wait_until(lambda: "hang" not in gw.gw.instances.leases.held, what="the lease given up")
    s3_proxy.delay = 3600.0
    started = time.monotonic()
    assert connect_sqlstate(gw.port, tls["ca"], "hang") == "57P03"  # local roles; the claim hangs
    assert time.monotonic() - started < 6.0 + 2.0
    assert "hang" not in gw.running()
    s3_proxy.delay = 0.0
