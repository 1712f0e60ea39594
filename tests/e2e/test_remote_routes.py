"""Remote routes end to end: a second, real Postgres 15 on 127.0.0.1 with TLS and SCRAM over
hostssl only; clients reach it through the gateway by SNI (or endpoint=) with real psql,
psycopg and asyncpg. The remote checks passwords; cancels reach it; outages answer 08001."""

from __future__ import annotations

import logging
import socket
import threading
import time

import psycopg
import pytest

from ..support.harness import connect_sqlstate, conninfo, psql, wait_until
from ..support.remotepg import REMOTE_PASSWORD, RemotePostgres, free_port
from ..support.cancelclient import assert_cancels


@pytest.fixture(scope="module")
def remote_pg():
    server = RemotePostgres()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def remote_gw(start_gateway, remote_pg):
    """A gateway routing ext1 to the remote (auth=password, the default) and ext2 likewise with
    auth=passthrough."""
    return start_gateway(remote_routes={"ext1": remote_pg.route(),
                                        "ext2": remote_pg.route(auth="passthrough")})


def test_psql_by_sni_reaches_the_remote_over_tls(remote_gw, remote_pg, tls):
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD),
               "select inet_server_port(), ssl from pg_stat_ssl where pid = pg_backend_pid()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{remote_pg.port}|t"  # the remote, and its leg is encrypted
    assert remote_gw.running() == set()  # no local instance was started for the id


def test_psycopg_queries_and_startup_parameters(remote_gw, remote_pg, tls):
    dsn = conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD,
                   options="'-c search_path=pg_catalog,public'", application_name="remote-test")
    with psycopg.connect(dsn) as conn:
        conn.execute("create temp table t (x int)")
        conn.execute("insert into t select generate_series(1, 1000)")
        assert conn.execute("select sum(x) from t").fetchone()[0] == 500500
        assert conn.execute("show search_path").fetchone()[0] == "pg_catalog,public"
        assert conn.execute("select current_setting('application_name')").fetchone()[0] == "remote-test"
        assert conn.execute("select current_setting('port')::int").fetchone()[0] == remote_pg.port
        big = conn.execute("select repeat('x', 3000000)").fetchone()[0]  # flow control path
        assert len(big) == 3_000_000


def test_endpoint_option_routes_to_the_remote(remote_gw, tls):
    # asyncpg names the database with options=endpoint=ext1 (no SNI: it connects by IP)
    assert connect_sqlstate(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD) is None


def test_wrong_password_gets_the_remotes_28p01_and_counts(remote_gw, tls):
    assert connect_sqlstate(remote_gw.port, tls["ca"], "ext1", password="wrong") == "28P01"
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext1", password="wrong"), "select 1")
    assert out.returncode != 0
    assert 'password authentication failed for user "postgres"' in out.stderr
    assert len(remote_gw.gw.limits.failed_db.events["ext1"]) == 2


def test_auth_failure_limit_applies_to_remote_routes(start_gateway, remote_pg, tls):
    gw = start_gateway(remote_routes={"ext1": remote_pg.route()}, auth_failures_per_minute=2)
    for _ in range(2):
        assert connect_sqlstate(gw.port, tls["ca"], "ext1", password="wrong") == "28P01"
    # the third attempt is refused by the gateway before the remote is asked, even a right one
    assert connect_sqlstate(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD) == "28000"


@pytest.mark.parametrize("db_id", ["ext1", "ext2"])  # auth=password, auth=passthrough
@pytest.mark.parametrize("role, encryption", [("md5user", "md5"), ("clearuser", "scram-sha-256")])
def test_md5_and_password_methods_on_the_remote(remote_gw, remote_pg, tls, db_id, role, encryption):
    remote_pg.sql(f"set password_encryption = '{encryption}'; drop role if exists {role}; "
                  f"create role {role} login password 'old-method-pw'")
    out = psql(conninfo(remote_gw.port, tls["ca"], db_id, user=role, password="old-method-pw"),
               "select current_user")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == role
    assert connect_sqlstate(remote_gw.port, tls["ca"], db_id, user=role, password="nope") == "28P01"


def test_unknown_role_on_the_remote(remote_gw, tls):
    assert connect_sqlstate(remote_gw.port, tls["ca"], "ext1", user="nobody",
                            password=REMOTE_PASSWORD) == "28P01"  # Postgres does not tell


def test_client_sees_the_remotes_pid_with_a_gateway_key(remote_gw, tls):
    # the pid is the remote backend's own (as for local instances); the key is registered
    # with the gateway, which alone knows the remote's secret
    with psycopg.connect(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD)) as conn:
        assert len(remote_gw.gw.cancels) == 1
        assert conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]
    wait_until(lambda: len(remote_gw.gw.cancels) == 0, what="the cancel key to be forgotten")


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_reaches_the_remote(remote_gw, tls, method):
    """Plain PQcancel (a new connection without SNI) and libpq 17+'s encrypted cancel both
    arrive at the gateway, which forwards the remote's own key over TLS to the remote."""
    dsn = conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD)
    assert_cancels(dsn, method)


def test_remote_down_answers_08001_quickly(start_gateway, tls):
    port = free_port()
    gw = start_gateway(remote_routes={"gone": {"host": "127.0.0.1", "port": port,
                                               "sslmode": "require"}})
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(conninfo(gw.port, tls["ca"], "gone", password="whatever"))
    assert time.monotonic() - started < 5
    text = str(info.value)
    assert 'could not connect to the server of database "gone" (a remote route)' in text
    assert "connection refused" in text
    assert "whatever" not in text and str(port) not in text  # no password, no address
    assert connect_sqlstate(gw.port, tls["ca"], "gone") == "08001"


def test_silent_remote_times_out_with_08001(start_gateway, tls):
    """A server that accepts TCP but never answers: remote_connect_timeout bounds the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads
        gw = start_gateway(remote_connect_timeout=1.0, remote_routes={"slow": {
            "host": "127.0.0.1", "port": silent.getsockname()[1], "sslmode": "require"}})
        started = time.monotonic()
        out = psql(conninfo(gw.port, tls["ca"], "slow", password="whatever"), "select 1")
        assert time.monotonic() - started < 6
        assert out.returncode != 0
        assert 'could not connect to the server of database "slow"' in out.stderr
        assert "no answer within 1s" in out.stderr


def test_remote_that_stalls_after_connecting_is_08001_not_a_handshake_timeout(start_gateway, tls):
    """Connected (no TLS on this route), the startup sent, and no answer: the client hears
    that the remote did not answer, after remote_connect_timeout, not the gateway's own
    handshake timeout blaming the client."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        gw = start_gateway(remote_connect_timeout=1.0, handshake_timeout=20.0, remote_routes={"mute": {
            "host": "127.0.0.1", "port": silent.getsockname()[1], "sslmode": "disable"}})
        started = time.monotonic()
        out = psql(conninfo(gw.port, tls["ca"], "mute", password="whatever"), "select 1")
        assert time.monotonic() - started < 6
        assert out.returncode != 0
        assert 'could not connect to the server of database "mute"' in out.stderr, out.stderr
        assert "did not answer during login within 1s" in out.stderr, out.stderr


def test_verify_full_with_a_wrong_server_name_fails_clearly(start_gateway, remote_pg, tls):
    gw = start_gateway(remote_routes={"ext1": remote_pg.route(server_name="other.remote.test")})
    out = psql(conninfo(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD), "select 1")
    assert out.returncode != 0
    assert 'could not connect to the server of database "ext1"' in out.stderr
    assert "certificate was refused" in out.stderr and "other.remote.test" in out.stderr
    assert connect_sqlstate(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD) == "08001"


def test_verify_full_with_the_wrong_ca_fails(start_gateway, remote_pg, tls):
    gw = start_gateway(remote_routes={"ext1": remote_pg.route(sslrootcert=str(tls["ca"]))})
    out = psql(conninfo(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD), "select 1")
    assert out.returncode != 0 and "certificate was refused" in out.stderr


def test_require_without_a_ca_encrypts_without_verifying(start_gateway, remote_pg, tls):
    gw = start_gateway(remote_routes={"ext1": {"host": "127.0.0.1", "port": remote_pg.port,
                                               "sslmode": "require"}})
    out = psql(conninfo(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD),
               "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "t"


def test_sslmode_disable_against_a_hostssl_only_remote_is_refused_by_it(start_gateway, remote_pg, tls):
    gw = start_gateway(remote_routes={"ext1": {"host": "127.0.0.1", "port": remote_pg.port,
                                               "sslmode": "disable"}})
    out = psql(conninfo(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD), "select 1")
    assert out.returncode != 0
    assert "no pg_hba.conf entry" in out.stderr  # the remote's own refusal, passed through


def test_passthrough_relays_scram_without_channel_binding(remote_gw, tls):
    """auth=passthrough: the remote's SASL exchange goes to the client, minus -PLUS. A client
    that sends gs2 flag 'n' (asyncpg, or libpq with channel_binding=disable) logs in."""
    assert connect_sqlstate(remote_gw.port, tls["ca"], "ext2", password=REMOTE_PASSWORD) is None
    assert connect_sqlstate(remote_gw.port, tls["ca"], "ext2", password="wrong") == "28P01"
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext2", password=REMOTE_PASSWORD,
                        channel_binding="disable"), "select 1")
    assert out.returncode == 0, out.stderr


def test_passthrough_limitation_with_libpq_default_channel_binding(remote_gw, tls):
    """libpq over TLS with channel_binding=prefer, offered plain SCRAM only, sends gs2 flag 'y';
    a remote reached over TLS rejects that as a downgrade. This is why auth=password is the
    default (see docs/remote-routes.md)."""
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext2", password=REMOTE_PASSWORD), "select 1")
    assert out.returncode != 0
    assert "SCRAM channel binding negotiation error" in out.stderr


def test_password_mode_binds_to_the_remotes_certificate(remote_gw, tls, caplog):
    caplog.set_level(logging.DEBUG, logger="pgsni.remote")
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD), "select 1")
    assert out.returncode == 0, out.stderr
    assert "logging in to the remote with SCRAM-SHA-256-PLUS" in caplog.text


def test_channel_binding_require_is_refused_in_password_mode(remote_gw, tls):
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD,
                        channel_binding="require"), "select 1")
    assert out.returncode != 0 and "channel binding" in out.stderr


def test_connection_log_line_says_route_remote(remote_gw, tls, caplog):
    caplog.set_level(logging.INFO, logger="pgsni.session")
    out = psql(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD), "select 1")
    assert out.returncode == 0, out.stderr

    def line():
        return [r for r in caplog.records if getattr(r, "event", None) == "connection"
                and getattr(r, "db", None) == "ext1"]

    wait_until(lambda: line(), what="the connection log line")
    record = line()[0]
    assert record.route == "remote" and record.auth == "ok" and record.outcome == "relayed"
    assert REMOTE_PASSWORD not in caplog.text


def test_per_database_cap_applies(start_gateway, remote_pg, tls):
    gw = start_gateway(remote_routes={"ext1": remote_pg.route()}, max_connections_per_db=1)
    with psycopg.connect(conninfo(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD)):
        assert connect_sqlstate(gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD) == "53300"


def test_local_ids_still_work_beside_remote_routes(remote_gw, tls):
    remote_gw.create_db("app1")
    out = psql(conninfo(remote_gw.port, tls["ca"], "app1"), "select current_setting('port')")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5432"  # a local instance (unix socket only)
    assert remote_gw.running() == {"app1"}


def test_shutdown_closes_remote_sessions_after_the_grace(remote_gw, tls):
    conn = psycopg.connect(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD))
    try:
        assert conn.execute("select 1").fetchone()[0] == 1
        started = time.monotonic()
        remote_gw.stop()  # shutdown_grace=2 in the tests
        assert time.monotonic() - started < 4.5  # not grace + the 5 s wait for instances
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        # it was waiting for its next query, so it is told why (57P01), as Postgres would
        assert "the gateway is shutting down" in str(info.value), info.value
    finally:
        conn.close()


def test_shutdown_in_the_middle_of_a_reply_only_closes(remote_gw, tls):
    """A client still reading a reply when the grace ends cannot be sent a message of the
    gateway's own (it would land inside a relayed one): it sees the connection end, not a
    garbled stream."""
    conn = psycopg.connect(conninfo(remote_gw.port, tls["ca"], "ext1", password=REMOTE_PASSWORD))
    try:
        rows = conn.cursor().stream("select repeat('x', 8000) from generate_series(1, 10000000)")
        assert len(next(rows)[0]) == 8000  # a reply of 80 GB has begun
        stopping = threading.Thread(target=remote_gw.stop)
        began = time.monotonic()
        stopping.start()
        with pytest.raises(psycopg.OperationalError) as info:
            for _ in rows:  # until the grace (2 s) ends
                pass
        cut = time.monotonic() - began
        stopping.join(30)
        message = str(info.value)  # the end of the connection, not a garbled message
        assert "closed" in message or "eof" in message, message
        for garbled in ("synchroni", "unexpected response", "do not agree", "invalid"):
            assert garbled not in message, message
        assert cut < 4, cut  # when the grace ends, not held for the wait for sessions (5 s)
    finally:
        conn.close()
