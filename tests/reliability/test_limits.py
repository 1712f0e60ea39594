"""Limits end to end, with real clients against a real gateway: connection caps (total, per
IP, per database), the wake rate, and the failed-login window (per IP and per database)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest

from gateway.wire import protocol as p

from ..support.harness import DOMAIN, TEST_PASSWORD, conninfo
from ..support.rawclient import RawClient
from ..support.tcpproxy import TCPProxy


def attempt(port: int, ca, db_id: str, password: str = TEST_PASSWORD) -> tuple[str | None, str]:
    """Log in with asyncpg: (None, "") on success, else (SQLSTATE, message)."""
    async def go():
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                                         database="postgres", ssl=ctx, timeout=30,
                                         server_settings={"options": f"endpoint={db_id}"})
        except asyncpg.PostgresError as e:
            return e.sqlstate, e.args[0]
        await conn.close()
        return None, ""
    return asyncio.run(go())


def hold(port: int, ca, db_id: str) -> psycopg.Connection:
    conn = psycopg.connect(conninfo(port, ca, db_id))
    conn.execute("select 1")
    return conn


@pytest.fixture
def second_ip():
    made = []

    def make(port: int) -> TCPProxy:
        made.append(TCPProxy(port, source="127.0.0.2"))
        return made[-1]
    yield make
    for f in made:
        f.close()


def eventually_ok(port: int, ca, db_id: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        result = attempt(port, ca, db_id)
        if result == (None, "") or time.monotonic() > deadline:
            assert result == (None, "")
            return
        time.sleep(0.1)


# --- connection caps -------------------------------------------------------------------------
def test_per_database_cap(start_gateway, tls):
    gw = start_gateway(max_connections_per_db=2)
    gw.create_db("app1")
    gw.create_db("app2")
    held = [hold(gw.port, tls["ca"], "app1") for _ in range(2)]
    try:
        assert attempt(gw.port, tls["ca"], "app1") == (
            "53300", 'too many connections to database "app1" (limit 2)')
        assert attempt(gw.port, tls["ca"], "app2") == (None, "")  # other databases are unaffected
        held.pop().close()
        eventually_ok(gw.port, tls["ca"], "app1")
        held.append(hold(gw.port, tls["ca"], "app1"))
        assert attempt(gw.port, tls["ca"], "app1")[0] == "53300"  # refusals were not counted
    finally:
        for c in held:
            c.close()


def test_per_ip_cap(start_gateway, tls, second_ip):
    gw = start_gateway(max_connections_per_ip=2)
    gw.create_db("app1")
    held = [hold(gw.port, tls["ca"], "app1") for _ in range(2)]
    try:
        assert attempt(gw.port, tls["ca"], "app1") == ("53300", "too many connections from 127.0.0.1 (limit 2)")
        other = second_ip(gw.port)
        assert attempt(other.port, tls["ca"], "app1") == (None, "")  # another IP is unaffected
        held.pop().close()
        eventually_ok(gw.port, tls["ca"], "app1")
    finally:
        for c in held:
            c.close()


def test_total_cap_counts_from_accept(start_gateway, tls):
    gw = start_gateway(max_client_connections=2)
    gw.create_db("app1")
    # two clients that connected but never sent a byte already fill the gateway
    idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(2)]
    time.sleep(0.3)
    try:
        assert attempt(gw.port, tls["ca"], "app1") == ("53300", "the gateway is at its connection limit (2)")
        # the refusal is readable over TLS too, with libpq
        err = None
        try:
            psycopg.connect(conninfo(gw.port, tls["ca"], "app1")).close()
        except psycopg.OperationalError as e:
            err = str(e)
        assert err is not None and "the gateway is at its connection limit (2)" in err
    finally:
        for s in idle:
            s.close()
    eventually_ok(gw.port, tls["ca"], "app1")


# --- wake rate -------------------------------------------------------------------------------
def _stopped_dbs(gw, n: int) -> list[str]:
    ids = [f"w{i}" for i in range(n)]
    for db_id in ids:
        gw.create_db(db_id)  # creation is not a client wake: it takes no token
        gw.call(lambda db_id=db_id: gw.gw.instances.stop(db_id))
    assert gw.running() == set()
    return ids


def test_wake_rate_refuses_starts_beyond_the_burst(start_gateway, tls):
    # burst 1, one token every 50 s, waits of at most 5 s: one start now, the others refused
    gw = start_gateway(wake_rate=0.02, wake_burst=1, start_timeout=5.0)
    ids = _stopped_dbs(gw, 3)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda d: attempt(gw.port, tls["ca"], d), ids))
    assert sorted(results, key=str) == [("53300", "too many databases are starting; try again")] * 2 + [(None, "")]
    assert len(gw.running()) == 1


def test_wake_rate_spaces_starts(start_gateway, tls):
    gw = start_gateway(wake_rate=2.0, wake_burst=1, start_timeout=30.0)
    ids = _stopped_dbs(gw, 4)
    manager = gw.gw.instances
    starts: list[float] = []
    real_launch = manager.launcher.launch

    async def timed_launch(inst):
        starts.append(time.monotonic())
        return await real_launch(inst)
    manager.launcher.launch = timed_launch
    time.sleep(1.0)  # the bucket is full again (burst 1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: attempt(gw.port, tls["ca"], d), ids))
    assert results == [(None, "")] * 4  # they waited for their turn rather than failing
    starts.sort()
    # 2 a second with a burst of 1: the last start comes at least 3 tokens (1.5 s) after the
    # first. (Not each gap: a start that took its token late, on a loaded machine, leaves a
    # shorter gap to the next, whose token came on time.)
    assert len(starts) == 4 and starts[-1] - starts[0] >= 1.4, [b - a for a, b in zip(starts, starts[1:])]


# --- failed authentication -------------------------------------------------------------------
def test_auth_failures_per_ip_and_per_database(start_gateway, tls, second_ip):
    gw = start_gateway(auth_failures_per_minute=3)
    for db_id in ("app1", "app2", "app3"):
        gw.create_db(db_id)
    ca = tls["ca"]
    for _ in range(5):  # successful logins do not count
        assert attempt(gw.port, ca, "app1") == (None, "")
    for _ in range(2):
        assert attempt(gw.port, ca, "app1", password="wrong")[0] == "28P01"
    assert attempt(gw.port, ca, "app1") == (None, "")  # two failures: still below the limit
    assert attempt(gw.port, ca, "app1", password="wrong")[0] == "28P01"
    blocked = ("28000", "too many failed authentication attempts; try again later")
    assert attempt(gw.port, ca, "app1") == blocked  # even the right password
    assert attempt(gw.port, ca, "app2") == blocked  # per IP: every database from 127.0.0.1
    other = second_ip(gw.port)
    assert attempt(other.port, ca, "app1") == blocked  # per database: app1 from any IP
    assert attempt(other.port, ca, "app2") == (None, "")  # another IP to another database
    # refused before SCRAM: the answer to the startup message is the error, not a SASL request
    raw = RawClient(gw.port)
    try:
        raw.start_tls(str(ca), f"app3.{DOMAIN}")
        raw.startup({"user": "postgres", "database": "postgres"})
        first = raw.next_backend()
        assert isinstance(first, p.ErrorResponse) and first.code == "28000", first
    finally:
        raw.close()
