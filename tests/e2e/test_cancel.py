"""Cancel requests with the gateway's own keys reach the right backend: psql's Ctrl-C (a new
plain connection without SNI), libpq 18's encrypted cancel, and unknown keys ignored."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import warnings

import psycopg
import pytest

from gateway.wire import protocol as p

from ..support.harness import TEST_PASSWORD, conninfo
from ..support.rawclient import RawClient
from ..support.cancelclient import assert_cancels


def test_psql_ctrl_c_cancels_pg_sleep(gateway, tls):
    gateway.create_db("app1")
    proc = subprocess.Popen(["psql", conninfo(gateway.port, tls["ca"], "app1"), "-X", "-c",
                             "select pg_sleep(30)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(1.5)  # let the query start
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert time.monotonic() - started < 10
    assert "canceling statement due to user request" in err




@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg_cancel(gateway, tls, method):
    """`cancel` is libpq's classic PQcancel (plain, no SNI); `cancel_safe` is libpq 17+'s
    cancel over the connection's own encryption. The client runs in its own process: PQcancel
    blocks holding the GIL, which would stall the in-process gateway thread."""
    gateway.create_db("app1")
    assert_cancels(conninfo(gateway.port, tls["ca"], "app1"), method)


def test_unknown_cancel_key_is_ignored(gateway, tls):
    gateway.create_db("app1")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1")) as conn:
        raw = RawClient(gateway.port)
        raw.send(p.CancelRequest(12345, b"\x00\x01\x02\x03").encode())
        assert raw.closed()  # closed without a word, as Postgres does
        raw.close()
        assert conn.execute("select pg_sleep(0.2), 'not cancelled'").fetchone()[1] == "not cancelled"


def test_cancel_keys_are_forgotten_after_the_session(gateway, tls):
    gateway.create_db("app1")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1")) as conn:
        assert len(gateway.gw.cancels) == 1
    deadline = time.monotonic() + 5
    while len(gateway.gw.cancels) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(gateway.gw.cancels) == 0



def test_the_client_is_told_its_real_backend_pid(gateway, tls):
    """As on a direct connection: pg_backend_pid(), pg_stat_activity, NOTIFY's sender and
    pg_terminate_backend all agree with the pid the client was given."""
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], "app1")
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as other:
        pid = conn.info.backend_pid
        assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)
        assert other.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone() == (1,)
        conn.execute("listen ping")
        conn.execute("notify ping, 'mine'")
        note = next(conn.notifies(timeout=5, stop_after=1))
        assert (note.pid, note.payload) == (pid, "mine")  # libraries skip their own by this
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "PID ... is not a PostgreSQL backend process" was one
            assert other.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")


@pytest.mark.parametrize("minor, length", [(0, 4), (2, 32)])
def test_cancel_keys_follow_the_protocol_version(gateway, tls, minor, length):
    """3.0 clients get 4-byte secrets (longer ones would break them), 3.2 clients 32 bytes as
    from Postgres 18; either way the real pid, and a cancel with that key works."""
    gateway.create_db("app1")
    raw = RawClient(gateway.port)
    raw.start_tls(str(tls["ca"]), "app1.db.example.com")
    raw.startup({"user": "postgres", "database": "postgres"}, minor=minor)
    raw.scram("postgres", TEST_PASSWORD, auth=raw.next_backend())
    events = []
    while not isinstance(msg := raw.next_backend(), p.ReadyForQuery):
        events.append(msg)
    assert not any(isinstance(e, p.NegotiateProtocolVersion) for e in events)  # 3.2 is spoken
    (key,) = [e for e in events if isinstance(e, p.BackendKeyData)]
    assert len(key.secret) == length
    assert raw.rows("select pg_backend_pid()") == [[str(key.pid)]]
    raw.send_query("select pg_sleep(30)")
    time.sleep(0.3)
    wrong = p.CancelRequest(key.pid, bytes(length))  # the right pid is not enough
    for request in (wrong, p.CancelRequest(key.pid, key.secret)):
        with socket.create_connection(("127.0.0.1", gateway.port)) as s:
            s.sendall(request.encode())
            s.recv(1)
    assert raw.error_text() == "canceling statement due to user request"
    raw.close()


def test_a_newer_protocol_is_negotiated_down_to_3_2(gateway, tls):
    gateway.create_db("app1")
    raw = RawClient(gateway.port)
    raw.start_tls(str(tls["ca"]), "app1.db.example.com")
    raw.startup({"user": "postgres", "database": "postgres", "_pq_.unknown": "1"}, minor=5)
    first = raw.next_backend()
    assert isinstance(first, p.NegotiateProtocolVersion)
    assert (first.newest_minor, first.unsupported) == (2, ("_pq_.unknown",))
    raw.close()
