"""A hostile tenant (role `postgres` of its own database, default settings) against the
gateway itself rather than the operating system: settings it may store for every login to
its database reaching the gateway's own sessions, and the gateway's per-login work that it
can make grow. Each test first shows the attack was really in place."""

from __future__ import annotations

import logging
import time
import tracemalloc

import psycopg
import pytest

from ..support.harness import conninfo
from .conftest import MAJORS, TENANT_PW

# what a tenant stores with ALTER DATABASE ... SET (any database owner may), and the first
# major that has the setting. The gateway's admin sessions (role reads at every login and
# stop, the WAL shipper's checks at every start) set search_path, DateStyle and the other
# timeouts themselves, not these.
STORED = [("client_encoding", "SQL_ASCII", 15),     # psycopg then returns text as bytes
          ("transaction_timeout", "1ms", 17),       # ends the admin's session mid-check
          ("idle_session_timeout", "100ms", 14)]    # ends the long-lived role reader


def _tenant(gw, tls, major: str) -> psycopg.Connection:
    # the tenant's own sessions opt out of what it stores for everyone (startup options win)
    mine = "-c idle_session_timeout=0" + (" -c transaction_timeout=0" if int(major) >= 17 else "")
    return psycopg.connect(conninfo(gw.port, tls["ca"], "tenant", password=TENANT_PW,
                                    client_encoding="UTF8", options=f"'{mine}'"), autocommit=True)


@pytest.mark.parametrize("major", MAJORS)
@pytest.mark.parametrize("name,value,since", STORED, ids=[s[0] for s in STORED])
def test_settings_a_tenant_stores_do_not_break_the_gateways_sessions(attacked, tls, major, name,
                                                                     value, since, caplog):
    """ALTER DATABASE postgres SET client_encoding = 'SQL_ASCII' (or transaction_timeout =
    '1ms' on 17+) and the database never starts again: the gateway's start-up check of the
    instance (walship: wal_level comes back as b'replica') or its first role read fails, every
    login gets 57P03 "could not be started", and so does every operator command that needs it
    running. idle_session_timeout ends the gateway's role reader between logins: the stop's
    read of the roles fails and a role made just before is not saved (it cannot log in to the
    stopped database)."""
    if int(major) < since:
        pytest.skip(f"{name} exists from Postgres {since} on")
    gw = attacked(major)
    with _tenant(gw, tls, major) as conn:
        conn.execute(f"ALTER DATABASE postgres SET {name} = '{value}'")
        stored = conn.execute("SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting "
                              "WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = 'postgres') "
                              "AND setrole = 0").fetchone()[0]
        assert f"{name}={value}" in stored  # the attack is in place
    gw.call(lambda: gw.gw.instances.stop("tenant"))  # its next start is the gateway's first login under it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with _tenant(gw, tls, major) as conn:  # fails today: FATAL database "tenant" could not be started
            assert conn.execute("SELECT current_setting('server_version_num')").fetchone()[0].startswith(major)
            creates_roles = int(conn.info.server_version) >= 160000
            if creates_roles:
                conn.execute("CREATE ROLE late LOGIN PASSWORD 'late-pw-123456'")
        time.sleep(0.5)  # longer than the stored idle_session_timeout
        gw.call(lambda: gw.gw.instances.stop("tenant"))
    if creates_roles:
        assert "late" in gw.gw.catalog.roles("tenant"), "the stop did not save the roles it read"
    troubles = [r.getMessage()[:200] for r in caplog.records
                if r.levelno >= logging.WARNING and ("roles" in r.getMessage() or "starting" in r.getMessage())]
    assert not troubles, troubles


ROLES = 5000  # a tenant can make a million the same way (several creator roles keep it fast)
MAKE_ROLES = """CREATE PROCEDURE make_roles(n int) LANGUAGE plpgsql AS $$ BEGIN
  FOR i IN 1..n LOOP
    EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', 'r' || i || repeat('x', 50),
      'SCRAM-SHA-256$4096:' || repeat('QUFB', 80) || '$QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE='
      || ':QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=');  -- as long as 18 allows (512 bytes)
    IF i % 500 = 0 THEN COMMIT; END IF;
  END LOOP; END $$"""


def _login_cost(gw, tls, major: str) -> int:
    """Bytes the gateway's process allocated at most (peak) while serving one login."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with _tenant(gw, tls, major) as conn:
            conn.execute("SELECT 1")
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_the_roles_a_tenant_makes_do_not_grow_the_gateways_work_per_login(attacked, tls):
    """From Postgres 16 the tenant has CREATEROLE. Every login to a running database reads
    every role with its verifier (dbroles.ROLE_QUERY through the role reader) into the
    gateway's one event loop, and builds a Role for each: with R roles each login costs the
    shared gateway O(R) memory and loop time (5000 roles: ~3 MB and ~40 ms a login; a million:
    ~0.8 GB and seconds with every other tenant's traffic stalled), and logins are not rate
    limited. What one login costs must not depend on how many roles the tenant made."""
    majors = [m for m in MAJORS if int(m) >= 16]
    if not majors:
        pytest.skip("a tenant makes roles from Postgres 16 on")
    major = majors[-1]
    gw = attacked(major)
    _login_cost(gw, tls, major)  # warm up
    baseline = min(_login_cost(gw, tls, major) for _ in range(3))
    with _tenant(gw, tls, major) as conn:
        conn.execute(MAKE_ROLES)
        conn.execute("CALL make_roles(%s)", (ROLES,))
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'r%%xxxxxxxx'").fetchone()[0] == ROLES
    _login_cost(gw, tls, major)  # the first read after the change also saves roles.json
    loaded = min(_login_cost(gw, tls, major) for _ in range(3))
    assert baseline < 2 << 20, baseline  # the control: a login costs little without the roles
    assert loaded < baseline + (1 << 20), (
        f"a login allocates {loaded / 1e6:.1f} MB in the gateway with {ROLES} tenant roles, "
        f"{baseline / 1e6:.1f} MB without")


def test_a_database_made_before_the_admin_role_stored_its_settings_gets_them(start_gateway, tls):
    """Databases secured before the admin role stored transaction_timeout = 0 (17 and later)
    get it from the role reader's first connection after a start, before a tenant's stored
    setting can end the gateway's sessions."""
    gw = start_gateway()
    gw.create_db("older", TENANT_PW, MAJORS[-1])
    if int(MAJORS[-1]) < 17:
        pytest.skip("transaction_timeout exists from Postgres 17 on")
    query = ("SELECT coalesce(array_to_string(setconfig, ','), '') FROM pg_db_role_setting "
             "WHERE setdatabase = 0 AND setrole = 10")
    assert gw.admin_sql("older", query) == [("transaction_timeout=0",)]  # from the template
    gw.admin_sql("older", "ALTER ROLE pgsni_admin RESET transaction_timeout")  # as made before
    assert gw.admin_sql("older", query) == []
    gw.call(lambda: gw.gw.instances.stop("older"))
    with psycopg.connect(conninfo(gw.port, tls["ca"], "older", password=TENANT_PW)) as conn:
        conn.execute("SELECT 1")
    assert gw.admin_sql("older", query) == [("transaction_timeout=0",)]
