"""Cancel requests with the gateway's own keys reach the right backend: psql's Ctrl-C (a new
plain connection without SNI), libpq 18's encrypted cancel, and unknown keys ignored."""

from __future__ import annotations

import signal
import subprocess
import time

import psycopg
import pytest

from gateway import protocol as p

from ..support.harness import conninfo
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
        pid = conn.info.backend_pid
        real_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert pid != real_pid  # the client sees the gateway's key, not the backend's
    deadline = time.monotonic() + 5
    while len(gateway.gw.cancels) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(gateway.gw.cancels) == 0
