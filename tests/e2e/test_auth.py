"""Authentication happens at the gateway, before anything wakes: refusals carry the right
SQLSTATE and start no Postgres."""

from __future__ import annotations

import psycopg
import pytest

from ..support.harness import conninfo, connect_sqlstate, postmasters


def _sqlstate(dsn: str) -> str:
    """The libpq error text of a refused connection."""
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn).close()
    return str(info.value)


@pytest.fixture
def stopped_db(gateway):
    gateway.create_db("app1")
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    assert gateway.running() == set()
    return gateway


def test_wrong_password_starts_nothing(stopped_db, tls, data_root):
    gw = stopped_db
    starts = gw.gw.instances.starts
    msg = _sqlstate(conninfo(gw.port, tls["ca"], "app1", password="wrong"))
    assert 'password authentication failed for user "postgres"' in msg
    assert gw.gw.instances.starts == starts
    assert postmasters(data_root / "app1" / "pgdata") == []


def test_wrong_password_sqlstate_is_28P01(stopped_db, tls):
    assert connect_sqlstate(stopped_db.port, tls["ca"], "app1", password="nope") == "28P01"
    assert stopped_db.running() == set()


def test_unknown_role_reads_like_a_wrong_password(stopped_db, tls):
    # Postgres answers both with 28P01 and the same text: no way to probe for role names
    assert connect_sqlstate(stopped_db.port, tls["ca"], "app1", user="mallory") == "28P01"
    unknown = _sqlstate(conninfo(stopped_db.port, tls["ca"], "app1", user="mallory"))
    wrong = _sqlstate(conninfo(stopped_db.port, tls["ca"], "app1", user="postgres", password="x"))
    assert 'password authentication failed for user "mallory"' in unknown
    assert unknown.replace("mallory", "postgres") == wrong
    assert stopped_db.running() == set()


def test_unknown_database_is_3D000(gateway, tls):
    assert connect_sqlstate(gateway.port, tls["ca"], "nosuchdb") == "3D000"
    assert 'database "nosuchdb" does not exist' in _sqlstate(conninfo(gateway.port, tls["ca"], "nosuchdb"))
    assert gateway.gw.instances.starts == 0


def test_right_password_after_stop_uses_saved_verifiers(stopped_db, tls):
    with psycopg.connect(conninfo(stopped_db.port, tls["ca"], "app1")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert stopped_db.running() == {"app1"}


def test_password_change_is_seen_by_the_gateway(gateway, tls):
    gateway.create_db("app1")
    gateway.admin_sql("app1", "create role app login password 'first-pw'")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1"), autocommit=True) as conn:
        conn.execute("alter role postgres password 'rotated-pw'")  # a tenant changes its own
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    # stopped: the verifiers saved at stop time are used
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", user="app", password="first-pw")) as c:
        assert c.execute("select current_user").fetchone() == ("app",)
    assert connect_sqlstate(gateway.port, tls["ca"], "app1") == "28P01"
    psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", password="rotated-pw")).close()


def test_role_without_login_is_refused(gateway, tls):
    gateway.create_db("app1")
    gateway.admin_sql("app1", "create role viewer nologin password 'viewer-pw'")
    gateway.gw.settings.auth_cache_seconds = 0
    assert connect_sqlstate(gateway.port, tls["ca"], "app1", user="viewer", password="viewer-pw") == "28000"
    assert "not permitted to log in" in _sqlstate(
        conninfo(gateway.port, tls["ca"], "app1", user="viewer", password="viewer-pw"))


def test_create_on_connect_uses_the_dev_password(start_gateway, tls):
    gw = start_gateway(create_on_connect=True, dev_password="devpw")
    assert connect_sqlstate(gw.port, tls["ca"], "fresh", password="other") == "28P01"
    assert gw.gw.catalog.list() == []
    with psycopg.connect(conninfo(gw.port, tls["ca"], "fresh", password="devpw")) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)
    assert gw.gw.catalog.list() == ["fresh"]


def test_a_new_role_logs_in_at_once(gateway, tls):
    """As with Postgres: no cache between CREATE ROLE and the first login (it took up to
    auth_cache_seconds, 28000 meanwhile)."""
    gateway.create_db("app1")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1")):
        pass  # running, roles read
    gateway.admin_sql("app1", "create role fresh login password 'fresh-pw-1234'")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", user="fresh", password="fresh-pw-1234")) as c:
        assert c.execute("select current_user").fetchone() == ("fresh",)


def test_a_dropped_role_is_refused_at_once_and_after_a_stop(gateway, tls):
    """A login reads its own role fresh; what it finds changed (here: gone) is saved beside
    the database at once, so a login to the stopped database agrees."""
    gateway.create_db("app1")
    gateway.admin_sql("app1", "create role brief login password 'brief-pw-1234'")
    brief = conninfo(gateway.port, tls["ca"], "app1", user="brief", password="brief-pw-1234")
    with psycopg.connect(brief):
        pass
    assert "brief" in gateway.gw.catalog.roles("app1")
    gateway.admin_sql("app1", "drop role brief")
    assert connect_sqlstate(gateway.port, tls["ca"], "app1", user="brief", password="brief-pw-1234") == "28P01"
    assert "brief" not in gateway.gw.catalog.roles("app1"), "saved when the login found it gone"
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    assert connect_sqlstate(gateway.port, tls["ca"], "app1", user="brief", password="brief-pw-1234") == "28P01"
    assert gateway.running() == set()  # refused from the saved roles: nothing started


def test_no_login_reads_every_role(gateway, tls, monkeypatch):
    """A tenant may have made any number of roles (Postgres 16 on): a login, the first after
    a start too, reads its own role only; every role is read at the stop."""
    from gateway.compute.role_reader import RoleReader

    gateway.create_db("app1")
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    asked, read = [], RoleReader.read

    def recorded(self, names=None):
        asked.append(None if names is None else sorted(names))
        return read(self, names)
    monkeypatch.setattr(RoleReader, "read", recorded)
    for _ in range(2):  # the login that starts it (saved roles), one to the running instance
        with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1")) as conn:
            conn.execute("select 1")
    assert asked == [["postgres"]], asked  # (the start read them all before)
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    assert asked[-1] is None  # the stop saves them all


def test_a_password_change_counts_from_the_next_login(gateway, tls):
    gateway.create_db("app1")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1"), autocommit=True) as conn:
        conn.execute("alter role postgres password 'new-pw-5678'")
        assert connect_sqlstate(gateway.port, tls["ca"], "app1") == "28P01"  # the old one: no
        with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", password="new-pw-5678")) as new:
            assert new.execute("select 1").fetchone() == (1,)


def test_a_burst_of_startups_does_not_fork_a_backend_each_to_read_roles(gateway, tls):
    """Fresh roles per login come over one connection per instance: fifty clients with wrong
    passwords at once leave the instance's backends bounded (its reader, at most eight
    early logins, the observer) and all get Postgres' answer, none 53300."""
    import asyncio
    import ssl

    import asyncpg

    gateway.create_db("app1")
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "app1"), autocommit=True) as observer:
        peak = 0

        async def attempt() -> str:
            ctx = ssl.create_default_context(cafile=str(tls["ca"]))
            ctx.check_hostname = False
            try:
                await asyncpg.connect(host="127.0.0.1", port=gateway.port, user="postgres", password="wrong",
                                      database="postgres", ssl=ctx, timeout=30,
                                      server_settings={"options": "endpoint=app1"})
            except asyncpg.PostgresError as e:
                return e.sqlstate
            return "connected"

        async def burst() -> list[str]:
            nonlocal peak
            tasks = [asyncio.ensure_future(attempt()) for _ in range(50)]
            while not all(t.done() for t in tasks):
                rows = await asyncio.to_thread(lambda: observer.execute(
                    "select count(*) from pg_stat_activity where backend_type = 'client backend'").fetchone()[0])
                peak = max(peak, rows)
                await asyncio.sleep(0.01)
            return [t.result() for t in tasks]

        gateway.gw.settings.auth_failures_per_minute = 0  # this is about connections, not guessing
        gateway.gw.limits.failed_ip.limit = gateway.gw.limits.failed_db.limit = 0
        results = asyncio.run(burst())
    assert set(results) == {"28P01"}, results
    assert peak <= 1 + 1 + 8, peak  # observer, reader, early logins (not in pg_stat_activity yet)
