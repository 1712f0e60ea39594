"""Metrics without a gateway: registries are per gateway, reasons and kinds are mapped, and
the metered storage backend counts real failures but not answers."""

from __future__ import annotations

import pytest

from gateway.metrics import MeteredBackend, Metrics, auth_reason
from storage import errors as storage_errors
from storage.localdir import LocalDirBackend
from storage.s3 import S3Backend

from ..support.ports import free_port


def _value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_each_gateway_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.auth_failed("password")
    assert _value(a, "pgsni_auth_failures_total", reason="password") == 1
    assert _value(b, "pgsni_auth_failures_total", reason="password") is None
    text, content_type = a.render()
    assert b"pgsni_wakeups_total" in text and b"process_cpu_seconds_total" in text
    assert content_type.startswith("text/plain; version=0.0.4")
    open_metrics, content_type = a.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and open_metrics.endswith(b"# EOF\n")


def test_auth_reasons():
    assert auth_reason("28P01", 'password authentication failed for user "x"') == "password"
    assert auth_reason("28000", 'role "x" is not permitted to log in') == "no_login"
    assert auth_reason("3D000", 'database "x" does not exist') == "unknown_database"
    assert auth_reason("53300", "too many connections") is None


async def test_metered_backend_counts_failures_not_answers(tmp_path):
    m = Metrics()
    local = MeteredBackend(LocalDirBackend(tmp_path), m)
    await local.put("dbs/a/x.json", b"{}")
    assert (await local.get("dbs/a/x.json"))[0] == b"{}"
    with pytest.raises(storage_errors.NotFound):
        await local.get("dbs/a/missing.json")
    with pytest.raises(storage_errors.PreconditionFailed):
        await local.put("dbs/a/x.json", b"{}", if_none_match=True)
    assert [c async for c in local.download("dbs/a/x.json")] == [b"{}"]
    assert local.describe() == local.inner.describe()
    assert _value(m, "pgsni_storage_errors_total", kind="unavailable") is None

    # nothing listens on this port: the S3 backend gives up after its one attempt
    dead = MeteredBackend(S3Backend("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}",
                                    access_key="x", secret_key="x", region="us-east-1",
                                    attempts=1, timeout=2.0), m)
    try:
        with pytest.raises(storage_errors.StorageUnavailable):
            await dead.list("dbs/")
        with pytest.raises(storage_errors.StorageUnavailable):
            async for _ in dead.download("dbs/a/x.json"):
                pass
    finally:
        await dead.close()
    assert _value(m, "pgsni_storage_errors_total", kind="unavailable") == 2


def test_wal_shipping_events_are_counted():
    m = Metrics()
    m.wal_event("fallback")
    m.wal_event("failed_commits", 3)
    m.wal_event("lost_bytes", 16 << 20)
    assert _value(m, "pgsni_wal_sync_fallbacks_total") == 1
    assert _value(m, "pgsni_wal_sync_failed_commits_total") == 3
    assert _value(m, "pgsni_wal_lost_bytes_total") == 16 << 20
