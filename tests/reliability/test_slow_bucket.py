"""A bucket that is slow rather than down: the TCP proxy in front of the S3 server (moto)
adds latency to every chunk. Below `storage_timeout` a cold connect (restore from storage)
just takes longer; above it the client gets 57P03 in bounded time, and connects normally
once the latency is gone."""

from __future__ import annotations

import shutil
import time

import pytest

from ..support.harness import connect_sqlstate, conninfo, psql


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
