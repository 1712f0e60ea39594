"""Databases made by an older pgsni, whose clients logged in as the superuser `postgres`:
refused until `pgsni db secure` has run (with its name in the hint), then served with the same
password and data, as a role that is no superuser and owns what it owned; what the former
superuser left behind (other superusers, members of pg_execute_server_program, ALTER SYSTEM,
superuser-only settings, routines in untrusted languages) cannot be used any more."""

from __future__ import annotations

import psycopg
import pytest

from ..support.adminclient import AdminClient
from ..support.harness import connect_sqlstate, conninfo, postmasters, psql
from ..support.legacy import make_legacy_database
from ..support.ports import free_port
from .test_cli import cli  # noqa: F401  (the `cli` fixture)

PASSWORD = "legacy-pw-2024"
SETUP = """
create table items (id int primary key, name text);
insert into items select g, 'item ' || g from generate_series(1, 100) g;
create schema app;
create function app.whoami() returns text language sql security definer as 'select current_user::text';
create view app.v as select count(*) from items;
create sequence app.s;
create type app.mood as enum ('ok', 'meh');
create role boss superuser login password 'boss-pw-1234';
create role app_user login password 'app-pw-1234';
grant pg_execute_server_program to app_user;
grant select on items to app_user;
alter role postgres set work_mem = '8MB';
alter system set archive_mode = on;
alter system set archive_command = 'touch /tmp/pgsni-legacy-archived';
alter database postgres set session_preload_libraries = 'nonexistent_library';
"""


@pytest.fixture
def legacy(data_root):
    make_legacy_database(data_root, "old1", PASSWORD, SETUP)
    return "old1"


def _connect(gw, tls, db_id, **kw):
    return psycopg.connect(conninfo(gw.port, tls["ca"], db_id, **kw), autocommit=True)


def test_a_legacy_database_is_refused_until_secured(start_gateway, tls, data_root, legacy):
    gw = start_gateway()
    with pytest.raises(psycopg.OperationalError) as refused:
        _connect(gw, tls, legacy, password=PASSWORD)
    assert "pgsni db secure old1" in str(refused.value)
    assert connect_sqlstate(gw.port, tls["ca"], legacy, password=PASSWORD) == "28000"
    # a wrong password learns nothing more than it would elsewhere
    assert connect_sqlstate(gw.port, tls["ca"], legacy, password="wrong") == "28P01"
    assert gw.running() == set() and postmasters(data_root / legacy / "pgdata") == []


def test_db_secure_keeps_data_and_password_and_takes_superuser_away(start_gateway, tls, data_root,
                                                                    legacy, cli):
    out = cli("db", "secure", legacy)
    assert out.returncode == 0, out.stderr
    assert "old1: secured, stored as version" in out.stdout
    assert "'postgres' is now the gateway's pgsni_admin" in out.stdout
    assert "no longer superuser: boss" in out.stdout
    assert "revoked: pg_execute_server_program from app_user" in out.stdout
    assert "session_preload_libraries=nonexistent_library" in out.stdout  # reset, and said so
    versions = cli("db", "versions", legacy).stdout.splitlines()
    assert len(versions) == 2  # the state before securing stays in storage

    gw = start_gateway()
    with _connect(gw, tls, legacy, password=PASSWORD) as conn:  # same password
        one = lambda q: conn.execute(q).fetchone()[0]  # noqa: E731
        assert one("select count(*) from items") == 100
        assert one("select current_user") == "postgres" and one("show is_superuser") == "off"
        assert one("select rolsuper from pg_roles where rolname = 'postgres'") is False
        assert one("select rolname from pg_roles where oid = 10") == "pgsni_admin"
        # what the superuser owned is the tenant's now, security definer functions included
        assert one("select pg_get_userbyid(relowner) from pg_class where relname = 'items'") == "postgres"
        assert one("select pg_get_userbyid(nspowner) from pg_namespace where nspname = 'app'") == "postgres"
        assert one("select app.whoami()") == "postgres"
        assert one("select * from app.v") == 100 and one("select nextval('app.s')") == 1
        conn.execute("create table more (x app.mood)")
        conn.execute("insert into items values (101, 'new')")
        # the former superuser's leftovers are gone or powerless
        assert one("select rolsuper from pg_roles where rolname = 'boss'") is False
        assert one("select pg_has_role('app_user', 'pg_execute_server_program', 'MEMBER')") is False
        assert one("show archive_mode") == "off"
        assert one("show session_preload_libraries") == ""
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("copy items to program 'cat'")
    with _connect(gw, tls, legacy, user="app_user", password="app-pw-1234") as app:
        assert app.execute("select count(*) from items").fetchone()[0] == 101
    # a demoted superuser logs in as an ordinary role
    with _connect(gw, tls, legacy, user="boss", password="boss-pw-1234") as boss:
        assert boss.execute("show is_superuser").fetchone()[0] == "off"
    gw.stop()  # saves what the session wrote
    stored = cli("db", "versions", legacy).stdout
    again = cli("db", "secure", legacy)
    assert again.returncode == 0 and "old1: already secured" in again.stdout
    assert cli("db", "versions", legacy).stdout == stored  # nothing new stored


def test_db_secure_refuses_untrusted_routines_and_changes_nothing(start_gateway, tls, data_root, cli):
    make_legacy_database(data_root, "old2", PASSWORD, SETUP + "create function evil(int) returns int "
                         "language internal as 'int4abs';\n")
    out = cli("db", "secure", "old2")
    assert out.returncode != 0
    assert "routine public.evil(integer) in language internal" in out.stderr and "--drop-untrusted" in out.stderr
    gw = start_gateway()
    assert connect_sqlstate(gw.port, tls["ca"], "old2", password=PASSWORD) == "28000"  # still refused
    gw.stop()
    out = cli("db", "secure", "old2", "--drop-untrusted")
    assert out.returncode == 0, out.stderr
    assert "dropped: routine public.evil(integer) in language internal in database postgres" in out.stdout
    gw = start_gateway()
    with _connect(gw, tls, "old2", password=PASSWORD) as conn:
        assert conn.execute("select count(*) from items").fetchone()[0] == 100
        assert conn.execute("select to_regprocedure('evil(int)')").fetchone()[0] is None


def test_secure_over_the_admin_api(start_gateway, tls, data_root, legacy):
    gw = start_gateway(admin_port=free_port(), admin_token="tok")
    admin = AdminClient(gw.settings.admin_port, "tok")
    plan = admin.post(f"/v1/databases/{legacy}/secure?dry_run=true", {})
    assert plan.status == 200 and plan.json()["dry_run"] is True
    assert connect_sqlstate(gw.port, tls["ca"], legacy, password=PASSWORD) == "28000"
    assert admin.post(f"/v1/databases/{legacy}/secure", {"drop_untrusted": "yes"}).status == 400
    done = admin.post(f"/v1/databases/{legacy}/secure", {})
    assert done.status == 200, done.body
    body = done.json()
    assert body["changed"] is True and body["renamed"] == "postgres" and body["demoted"] == ["boss"]
    with _connect(gw, tls, legacy, password=PASSWORD) as conn:
        assert conn.execute("show is_superuser").fetchone()[0] == "off"
    assert admin.post(f"/v1/databases/{legacy}/secure", {}).json()["changed"] is False
    out = psql(conninfo(gw.port, tls["ca"], legacy, password=PASSWORD), "select count(*) from items")
    assert out.stdout.strip() == "100"


def test_a_role_named_like_the_gateways_setup_role_is_refused_clearly(start_gateway, tls, data_root, cli):
    """pgsni_setup exists only while securing runs, so a tenant (Postgres 16 on: CREATEROLE,
    before an upgrade re-secures its copy), an imported archive or an old superuser may have
    made a role of that name. Securing must never run its superuser steps as a role someone
    else made, with settings they chose: it refuses, naming the role and what to do."""
    make_legacy_database(data_root, "squat", PASSWORD, SETUP + "create role pgsni_setup login;\n"
                         "alter role pgsni_setup set search_path = app;\n")
    out = cli("db", "secure", "squat")
    assert out.returncode != 0
    assert "pgsni_setup" in out.stderr and "not made by pgsni" in out.stderr and "rename" in out.stderr, \
        out.stderr
    gw = start_gateway()
    assert connect_sqlstate(gw.port, tls["ca"], "squat", password=PASSWORD) == "28000"  # still refused
