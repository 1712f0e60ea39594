"""The backend login runs while the client is still authenticating (gateway/proxy/session.py,
`_early_login`), for running instances only; whatever the client does, nothing it started is
left behind: no backend connection, no client count, no in-flight entry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from gateway.wire import protocol as p
from gateway.proxy import login, relay

from ..support.harness import DOMAIN, TEST_PASSWORD, conninfo, wait_until
from ..support.rawclient import RawClient

def backend_titles(gateway, db_id: str) -> list[str]:
    """Process titles of the instance's client backends ("postgres: <user> <database> [local]
    <state>"): one still authenticating (an early login waits there for its client's proof)
    is not in pg_stat_activity yet."""
    postmaster = gateway.gw.instances.instances[db_id].process.pid
    titles = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if (int(stat.rsplit(")", 1)[1].split()[1]) == postmaster and "[local]" in title
                and "pgsni_admin" not in title):  # the gateway's own connection reading roles
            titles.append(title.strip())
    return titles


def client_backends(gateway, db_id: str) -> int:
    return len(backend_titles(gateway, db_id))


def _left_behind_nothing(gateway, observer: psycopg.Connection, db_id: str, within: float = 10) -> None:
    """Only the observer's own backend and client count remain."""
    try:
        wait_until(lambda: client_backends(gateway, db_id) == 1, timeout=within, what="backends gone")
    except AssertionError:
        raise AssertionError(f"backends left: {backend_titles(gateway, db_id)}") from None
    wait_until(lambda: gateway.gw.instances.instances[db_id].clients == 1, what="count back")
    assert gateway.gw.early_logins == {}


def test_a_warm_connect_logs_in_to_the_backend_during_scram(gateway, tls):
    gateway.create_db("warm")
    dsn = conninfo(gateway.port, tls["ca"], "warm")
    with psycopg.connect(dsn) as first:  # the instance is running from here on
        started = gateway.gw.early_logins_started
        with psycopg.connect(dsn, application_name="second") as second:
            assert second.execute("select current_setting('application_name')").fetchone() == ("second",)
        assert gateway.gw.early_logins_started == started + 1
        assert first.execute("select 1").fetchone() == (1,)


def test_a_cold_connect_does_not_start_the_instance_before_authentication(gateway, tls):
    gateway.create_db("cold")
    gateway.call(lambda: gateway.gw.instances.stop("cold"))
    started = gateway.gw.early_logins_started
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(conninfo(gateway.port, tls["ca"], "cold", password="wrong-password"))
    assert gateway.running() == set() and gateway.gw.early_logins_started == started
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "cold")) as conn:  # wakes it
        assert conn.execute("select 1").fetchone() == (1,)


def test_wrong_passwords_leave_no_backend_behind(gateway, tls):
    gateway.create_db("guarded")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "guarded"), autocommit=True) as observer:
        started = gateway.gw.early_logins_started
        for _ in range(3):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(conninfo(gateway.port, tls["ca"], "guarded", password="wrong-password"))
        assert gateway.gw.early_logins_started == started + 3  # each one did log in early
        _left_behind_nothing(gateway, observer, "guarded")


def test_a_cancel_lost_at_connect_leaves_no_backend_behind(gateway, tls, monkeypatch):
    """Python 3.11's wait_for returns a connection that completed as its task was cancelled,
    and the cancel is lost: the early login then goes on, and its backend asks for the
    client's proof. It must learn that none is coming (its keys are cancelled), not wait for
    them until start_timeout."""
    real = relay._connect

    async def connect_then_lose_the_cancel(socket_path, timeout):
        conn = await real(socket_path, timeout)
        try:  # the connection's completion is still on its way (3 s: the wrong password is
            await asyncio.sleep(3)  # refused meanwhile, unless the cancel was lost in `real`)...
        except asyncio.CancelledError:
            pass  # ...and lands with the cancel, which wait_for then drops
        return conn

    gateway.create_db("lost")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "lost"), autocommit=True) as observer:
        monkeypatch.setattr(relay, "_connect", connect_then_lose_the_cancel)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(conninfo(gateway.port, tls["ca"], "lost", password="wrong-password"))
        assert gateway.gw.early_logins_started >= 2  # the observer's and this one
        _left_behind_nothing(gateway, observer, "lost", within=5)


def test_a_client_that_leaves_mid_scram_leaves_no_backend_behind(gateway, tls):
    gateway.create_db("vanish")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "vanish"), autocommit=True) as observer:
        raw = RawClient(gateway.port)
        raw.start_tls(str(tls["ca"]), f"vanish.{DOMAIN}")
        raw.startup({"user": "postgres", "database": "postgres"})
        assert isinstance(raw.next_backend(), p.Authentication)  # SASL offered: early login runs
        wait_until(lambda: client_backends(gateway, "vanish") == 2, what="early backend")
        raw.close()
        _left_behind_nothing(gateway, observer, "vanish")


def test_early_logins_per_database_are_capped(gateway, tls, monkeypatch):
    monkeypatch.setattr(login, "EARLY_LOGINS_PER_DB", 2)
    gateway.create_db("capped")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "capped"), autocommit=True) as observer:
        waiting = []
        for _ in range(4):  # four clients stop after the server's SASL offer
            raw = RawClient(gateway.port)
            raw.start_tls(str(tls["ca"]), f"capped.{DOMAIN}")
            raw.startup({"user": "postgres", "database": "postgres"})
            assert isinstance(raw.next_backend(), p.Authentication)
            waiting.append(raw)
        wait_until(lambda: client_backends(gateway, "capped") == 3, what="two early backends")
        assert gateway.gw.early_logins == {"capped": 2}
        # one of them finishes: with or without a login done ahead, it gets a working session
        last = waiting.pop()
        last.scram("postgres", TEST_PASSWORD, auth=p.Authentication(p.AUTH_SASL, b""))
        while not isinstance(msg := last.next_backend(), p.ReadyForQuery):
            assert not isinstance(msg, p.ErrorResponse), msg
        last.close()
        for raw in waiting:
            raw.close()
        _left_behind_nothing(gateway, observer, "capped")


def test_an_early_login_that_cannot_reach_the_backend_is_retried_after_authentication(
        gateway, tls, monkeypatch):
    """E.g. the instance died between the check and the login: the session logs in the usual
    way after authentication (which restarts a dead instance) instead of failing."""
    from gateway.proxy import relay
    from gateway.errors import INTERNAL_ERROR, GatewayError

    gateway.create_db("retry")
    dsn = conninfo(gateway.port, tls["ca"], "retry")
    real_login, calls = relay.login, []

    async def first_fails(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise GatewayError(INTERNAL_ERROR, "could not reach the database server")
        return await real_login(*args, **kwargs)

    with psycopg.connect(dsn, autocommit=True) as observer:  # running from here on
        monkeypatch.setattr(relay, "login", first_fails)
        started = gateway.gw.early_logins_started
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert gateway.gw.early_logins_started == started + 1 and len(calls) == 2
        monkeypatch.setattr(relay, "login", real_login)
        _left_behind_nothing(gateway, observer, "retry")
