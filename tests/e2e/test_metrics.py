"""/metrics moves when the events happen: connections (by database and SNI method),
auth failures by reason, wake-ups and their phases, snapshot bytes, cancels, client bytes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import psycopg
import pytest

from gateway.wire import protocol as p

from ..support.adminclient import AdminClient
from ..support.harness import conninfo, wait_until
from ..support.ports import free_port
from ..support.rawclient import RawClient


@pytest.fixture
def gw_admin(start_gateway):
    gt = start_gateway(admin_port=free_port())
    return gt, AdminClient.of(gt.settings)


def _fails(dsn: str) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn).close()


@pytest.mark.slow
def test_wake_snapshot_and_connection_metrics(gw_admin, tls):
    gt, admin = gw_admin
    gw = gt.gw
    gt.create_db("app1")
    assert admin.metric("pgsni_instances_running") == 1
    assert admin.metric("pgsni_wakeups_total", result="ok") == 1
    # stopping saves a version: snapshot bytes and duration
    gt.call(lambda: gw.instances.stop("app1"))
    assert admin.metric("pgsni_instances_running") == 0
    saved = admin.metric("pgsni_snapshot_bytes_total", operation="save")
    assert saved > 100_000  # a fresh PGDATA is a few MB compressed
    assert admin.metric("pgsni_snapshot_seconds_count", operation="save") == 1
    # without a local copy, the next connect restores from storage and starts: every phase
    gt.call(lambda: asyncio.to_thread(gw.catalog.delete, "app1"))
    before = {ph: admin.metric("pgsni_wake_seconds_count", phase=ph)
              for ph in ("restore", "start", "login", "total")}
    with psycopg.connect(conninfo(gt.port, tls["ca"], "app1")) as conn:
        conn.execute("select repeat('x', 100000)").fetchone()
        m = admin.metrics()
        key = (("database", "app1"), ("sni_method", "sni"))
        assert m[("pgsni_connections_total", key)] == 1
        assert m[("pgsni_connections_current", key)] == 1
        assert m[("pgsni_client_connections_open", ())] == 1
        assert m[("pgsni_instances_running", ())] == 1
    for phase, n in before.items():
        assert admin.metric("pgsni_wake_seconds_count", phase=phase) == n + 1, phase
    assert admin.metric("pgsni_wake_seconds_sum", phase="total") > 0
    assert admin.metric("pgsni_wakeups_total", result="ok") == 2  # the create, then this wake
    assert admin.metric("pgsni_snapshot_bytes_total", operation="restore") == saved
    wait_until(lambda: admin.metric("pgsni_connections_current", database="app1", sni_method="sni") == 0,
               what="the current-connections gauge to drop")
    assert admin.metric("pgsni_client_bytes_total", direction="out") > 100_000  # the repeat() result
    assert admin.metric("pgsni_client_bytes_total", direction="in") > 0
    # a second connection to the running instance is not a wake
    with psycopg.connect(conninfo(gt.port, tls["ca"], "app1")):
        pass
    assert admin.metric("pgsni_wake_seconds_count", phase="total") == before["total"] + 1
    assert admin.metric("pgsni_connections_total", database="app1", sni_method="sni") == 2


def test_auth_failures_by_reason_and_bounded_labels(gw_admin, tls):
    gt, admin = gw_admin
    gt.create_db("app1")
    _fails(conninfo(gt.port, tls["ca"], "app1", password="wrong"))
    assert admin.metric("pgsni_auth_failures_total", reason="password") == 1
    _fails(conninfo(gt.port, tls["ca"], "app1", user="nobody"))
    assert admin.metric("pgsni_auth_failures_total", reason="unknown_role") == 1
    _fails(conninfo(gt.port, tls["ca"], "no-such-db"))
    assert admin.metric("pgsni_auth_failures_total", reason="unknown_database") == 1
    # refused connections count with an empty database label: a client's made-up SNI name
    # never becomes a label value
    wait_until(lambda: admin.metric("pgsni_connections_total", database="", sni_method="sni") == 3,
               what="three unauthenticated connections counted")
    names = {dict(labels).get("database") for (name, labels) in admin.metrics()
             if name == "pgsni_connections_total"}
    assert "no-such-db" not in names
    # the options method is a label of its own
    with psycopg.connect(conninfo(gt.port, tls["ca"], None, options="endpoint=app1")):
        pass
    assert admin.metric("pgsni_connections_total", database="app1", sni_method="options") == 1


def test_rate_limited_auth_is_its_own_reason(start_gateway, tls):
    gt = start_gateway(admin_port=free_port(), auth_failures_per_minute=1)
    admin = AdminClient.of(gt.settings)
    gt.create_db("app1")
    _fails(conninfo(gt.port, tls["ca"], "app1", password="wrong"))
    _fails(conninfo(gt.port, tls["ca"], "app1", password="wrong"))
    assert admin.metric("pgsni_auth_failures_total", reason="password") == 1
    assert admin.metric("pgsni_auth_failures_total", reason="rate_limited") == 1


def test_cancel_requests_are_counted(gw_admin, tls):
    gt, admin = gw_admin
    gt.create_db("app1")
    raw = RawClient(gt.port)
    raw.send(p.CancelRequest(12345, b"\x00\x01\x02\x03").encode())
    assert raw.closed()
    raw.close()
    wait_until(lambda: admin.metric("pgsni_cancel_requests_total", result="unknown") == 1,
               what="the unknown cancel key counted")
    proc = subprocess.Popen(["psql", conninfo(gt.port, tls["ca"], "app1"), "-X", "-c",
                             "select pg_sleep(30)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: admin.metric("pgsni_connections_current", database="app1", sni_method="sni") == 1,
               what="psql connected")
    time.sleep(0.5)  # let the query start
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert "canceling statement" in err
    assert admin.metric("pgsni_cancel_requests_total", result="forwarded") == 1
    # cancel connections are not client connections
    assert admin.metric("pgsni_connections_total", database="", sni_method="none") == 0
