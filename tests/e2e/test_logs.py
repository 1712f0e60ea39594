"""The one log line per connection, as JSON: id, client address, SNI method, user, auth result,
wake time, bytes both ways, duration, outcome; and never a password. Also `pgsni serve` with
log_format=json writes nothing but JSON lines."""

from __future__ import annotations

import json
import logging
import signal

import psycopg
import pytest

from gateway.logs import JSONFormatter

from ..support.adminclient import AdminClient
from ..support.harness import TEST_PASSWORD, conninfo, wait_until
from ..support.ports import free_port
from .test_shutdown import DEV_PASSWORD, serve  # noqa: F401  (fixture)


def _lines(caplog) -> list[dict]:
    fmt = JSONFormatter()
    return [json.loads(fmt.format(r)) for r in caplog.records
            if r.name == "pgsni.session" and getattr(r, "event", None) == "connection"]


@pytest.mark.slow
def test_connection_line_carries_every_field(gateway, tls, caplog):
    caplog.set_level(logging.INFO, logger="pgsni")
    gateway.create_db("app1")
    gateway.call(lambda: gateway.gw.instances.stop("app1"))  # so that this connection wakes it
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1")) as conn:
        sent = "y" * 50_000
        assert len(conn.execute("select repeat('x', 200000), %s::text", (sent,)).fetchone()[0]) == 200_000
    wait_until(lambda: _lines(caplog), what="the connection's log line")
    line = _lines(caplog)[0]
    assert line["message"] == "connection closed" and line["level"] == "INFO"
    assert line["db"] == "app1" and line["sni_method"] == "sni" and line["user"] == "postgres"
    assert line["auth"] == "ok" and line["auth_error"] is None and line["tls"] is True
    assert line["client"].startswith("127.0.0.1:")
    assert line["cold"] is True and 0 < line["wake_ms"] < 30_000
    assert line["bytes_in"] > 50_000  # our parameter went in
    assert line["bytes_out"] > 200_000  # the result came out
    assert 0 < line["duration_s"] < 60
    assert line["outcome"] == "relayed"


def test_failed_login_line_names_the_reason_and_no_secret(gateway, tls, caplog):
    caplog.set_level(logging.DEBUG, logger="pgsni")
    gateway.create_db("app1")
    wrong = "Wr0ng-secret-pw-xyz"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", password=wrong)).close()
    wait_until(lambda: _lines(caplog), what="the connection's log line")
    line = _lines(caplog)[0]
    assert line["auth"] == "failed" and line["auth_error"] == "password"
    assert line["outcome"] == "refused 28P01" and line["wake_ms"] is None
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0  # SCRAM went both ways
    everything = "\n".join(JSONFormatter().format(r) for r in caplog.records)
    assert wrong not in everything and TEST_PASSWORD not in everything


@pytest.mark.slow
def test_serve_logs_json_lines_and_serves_admin(serve, tls):  # noqa: F811
    token = "serve-admin-token-42"
    admin_port = free_port()
    gp = serve(log_format="json", admin_port=admin_port, admin_token=token)
    admin = AdminClient(admin_port, token)
    assert admin.get("/healthz", token="").status == 200
    wait_until(lambda: admin.get("/readyz").status == 200, what="ready")
    with psycopg.connect(conninfo(gp.port, tls["ca"], "app1", password=DEV_PASSWORD)) as conn:
        conn.execute("select 1")
    wait_until(lambda: admin.metric("pgsni_connections_total", database="app1", sni_method="sni") == 1,
               what="the connection counted")
    gp.proc.send_signal(signal.SIGTERM)
    assert gp.wait_exit(15) == 0, gp.log()
    records = [json.loads(line) for line in gp.log().splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    conns = [r for r in records if r.get("event") == "connection" and r.get("db") == "app1"]
    assert conns and conns[0]["bytes_out"] > 0 and conns[0]["bytes_in"] > 0
    assert any("admin API on" in r["message"] for r in records)
    assert token not in gp.log()
    # development mode announces its password on purpose, and nowhere else
    assert [r["message"] for r in records if DEV_PASSWORD in json.dumps(r)] == \
        [r["message"] for r in records if r["message"].startswith("DEVELOPMENT MODE")]

