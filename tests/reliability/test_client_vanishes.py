"""A client that disappears without a word (its socket reset) in the middle of a long query
or half-way through COPY FROM STDIN: its backend session goes away, the gateway's connection
counters return to zero, no row of the unfinished COPY is visible, and the database keeps
serving."""

from __future__ import annotations

import socket
import time

from gateway.wire import protocol as p

from ..support.harness import DOMAIN, TEST_PASSWORD, conninfo, psql, wait_until
from ..support.rawclient import RawClient


def _login(port: int, ca, app: str) -> RawClient:
    rc = RawClient(port, timeout=30)
    rc.start_tls(str(ca), f"app1.{DOMAIN}")
    rc.startup({"user": "postgres", "database": "postgres", "application_name": app})
    rc.scram("postgres", TEST_PASSWORD)
    while not isinstance(rc.next_backend(), p.ReadyForQuery):
        pass
    return rc


def _reset(rc: RawClient) -> None:
    """Vanish: RST instead of a goodbye (no Terminate, no TLS close_notify)."""
    rc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw = socket.socket(fileno=rc.sock.detach())
    raw.close()


def _sessions(dsn: str, app: str) -> int:
    out = psql(dsn, f"select count(*) from pg_stat_activity where application_name = '{app}'")
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def _counters_zero(gw) -> bool:
    limits = gw.gw.limits
    inst = gw.gw.instances.instances.get("app1")
    return (sum(limits.total.counts.values()) == 0 and sum(limits.per_ip.counts.values()) == 0
            and sum(limits.per_db.counts.values()) == 0 and not gw.gw.sessions
            and (inst is None or inst.clients == 0))


def test_client_vanishing_mid_query_ends_its_backend(gateway, tls):
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], "app1")
    rc = _login(gateway.port, tls["ca"], "vanish-sleep")
    rc.send(rc.query("select pg_sleep(300)"))
    wait_until(lambda: _sessions(dsn, "vanish-sleep") == 1, 10, "the query to start")
    started = time.monotonic()
    _reset(rc)
    wait_until(lambda: _sessions(dsn, "vanish-sleep") == 0, 15, "the backend of the vanished client to end")
    ended = time.monotonic() - started
    wait_until(lambda: _counters_zero(gateway), 10, "the gateway's counters to return to zero")
    out = psql(dsn, "select 1")
    assert out.returncode == 0 and out.stdout.strip() == "1"
    print(f"mid-query: backend gone {ended:.1f}s after the client vanished")


def test_client_vanishing_mid_copy_leaves_no_rows(gateway, tls):
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], "app1")
    assert psql(dsn, "create table t(id int, pad text); insert into t values (1, 'before')").returncode == 0
    rc = _login(gateway.port, tls["ca"], "vanish-copy")
    rc.send(rc.query("copy t from stdin"))
    msg = rc.next_message()
    assert msg.type == b"G", msg  # CopyInResponse
    rows = 200_000
    half = b"".join(f"{i}\t{'x' * 40}\n".encode() for i in range(2, rows // 2))
    for start in range(0, len(half), 1 << 16):
        rc.send(p.Message(b"d", half[start:start + (1 << 16)]).encode())
    wait_until(lambda: _sessions(dsn, "vanish-copy") == 1, 10, "the COPY to be running")
    _reset(rc)  # no CopyDone, no CopyFail: just gone
    wait_until(lambda: _sessions(dsn, "vanish-copy") == 0, 15, "the COPY's backend to end")
    wait_until(lambda: _counters_zero(gateway), 10, "the gateway's counters to return to zero")
    out = psql(dsn, "select count(*), max(id) from t")
    assert out.stdout.strip() == "1|1", out.stdout + out.stderr  # only the row committed before
    out = psql(dsn, "insert into t values (2, 'after'); select count(*) from t")
    assert out.returncode == 0 and out.stdout.split()[-1] == "2", out.stderr
