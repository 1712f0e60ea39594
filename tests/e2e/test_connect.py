"""Connecting through the gateway with real clients: psql, psycopg (libpq 18), asyncpg."""

from __future__ import annotations

import socket
import ssl

import asyncpg
import psycopg

from gateway.compute.pgbins import PgInstalls
from ..support.harness import DOMAIN, TEST_PASSWORD, conninfo, psql


def test_psql_lands_in_its_own_database(gateway, tls):
    gateway.create_db("app1")
    out = psql(conninfo(gateway.port, tls["ca"], "app1"),
               "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")
    assert out.returncode == 0, out.stderr
    # the backend connection is over the private unix socket, so Postgres sees no SSL itself
    assert out.stdout.strip() == "postgres|f"
    out = psql(conninfo(gateway.port, tls["ca"], "app1"), "show listen_addresses")
    assert out.stdout.strip() == ""


def test_databases_are_isolated(gateway, tls):
    gateway.create_db("app1")
    gateway.create_db("app2")
    a, b = conninfo(gateway.port, tls["ca"], "app1"), conninfo(gateway.port, tls["ca"], "app2")
    assert psql(a, "create table only_in_a(x int); insert into only_in_a values (42)").returncode == 0
    assert psql(a, "select x from only_in_a").stdout.strip() == "42"
    out = psql(b, "select x from only_in_a")
    assert out.returncode != 0 and 'relation "only_in_a" does not exist' in out.stderr
    dirs = {psql(c, "show data_directory").stdout.strip() for c in (a, b)}
    assert len(dirs) == 2 and all(d.endswith("/pgdata") for d in dirs)


def test_psycopg_direct_tls_and_channel_binding(gateway, tls):
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], "app1", sslnegotiation="direct", channel_binding="require")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
        assert conn.pgconn.ssl_in_use
        assert conn.info.parameter_status("server_version").split(".")[0] == PgInstalls().default_major


def test_psycopg_newer_protocol_is_negotiated_down(gateway, tls):
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], "app1", max_protocol_version="3.2")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 'ok'").fetchone() == ("ok",)
        assert conn.pgconn.protocol_version == 3


def test_no_sni_with_endpoint_option(gateway, tls):
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], None, options="'endpoint=app1 -c search_path=foo'")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("show search_path").fetchone() == ("foo",)
        assert conn.execute("select count(*) from pg_class").fetchone()[0] > 0


def test_no_sni_without_endpoint_is_told_how_to_fix_it(gateway, tls):
    out = psql(conninfo(gateway.port, tls["ca"], None), "select 1")
    assert out.returncode != 0
    assert "no database id" in out.stderr and "options=endpoint=<id>" in out.stderr


def test_sni_and_endpoint_must_agree(gateway, tls):
    gateway.create_db("app1")
    out = psql(conninfo(gateway.port, tls["ca"], "app1", options="endpoint=app2"), "select 1")
    assert out.returncode != 0 and "app2" in out.stderr and "app1" in out.stderr


async def test_asyncpg_with_endpoint_option(gateway, tls):
    gateway.create_db("app1")
    ctx = ssl.create_default_context(cafile=str(tls["ca"]))
    ctx.check_hostname = False
    conn = await asyncpg.connect(host="127.0.0.1", port=gateway.port, user="postgres",
                                 password=TEST_PASSWORD, database="postgres", ssl=ctx,
                                 server_settings={"options": "endpoint=app1"})
    try:
        assert await conn.fetchval("select 40 + 2") == 42
    finally:
        await conn.close()


async def test_asyncpg_direct_tls_with_sni(gateway, tls, monkeypatch):
    """asyncpg has no hostaddr, so the name must resolve: point *.db.example.com at loopback."""
    gateway.create_db("app2")
    real = socket.getaddrinfo

    def resolve(host, *args, **kw):
        if isinstance(host, str) and host.endswith("." + DOMAIN):
            host = "127.0.0.1"
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    ctx = ssl.create_default_context(cafile=str(tls["ca"]))
    conn = await asyncpg.connect(host=f"app2.{DOMAIN}", port=gateway.port, user="postgres",
                                 password=TEST_PASSWORD, database="postgres", ssl=ctx, direct_tls=True)
    try:
        assert (await conn.fetchval("select current_setting('data_directory')")).endswith("/app2/pgdata")
    finally:
        await conn.close()


def test_plain_connection_is_refused_when_tls_is_required(gateway, tls):
    gateway.create_db("app1")
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    starts = gateway.gw.instances.starts
    out = psql(f"host=127.0.0.1 port={gateway.port} user=postgres sslmode=disable "
               f"options=endpoint=app1 password={TEST_PASSWORD}", "select 1")
    assert out.returncode != 0 and "requires TLS" in out.stderr and "sslmode=require" in out.stderr
    assert gateway.gw.instances.starts == starts and gateway.running() == set()


def test_an_uppercase_host_name_reaches_the_same_database(gateway, tls):
    """DNS names are case-insensitive: libpq sends the SNI as written, the certificate still
    matches, and ABC.DB.EXAMPLE.COM is database abc."""
    gateway.create_db("abc")
    dsn = conninfo(gateway.port, tls["ca"], "abc").replace(f"host=abc.{DOMAIN}", f"host=ABC.{DOMAIN.upper()}")
    assert f"host=ABC.{DOMAIN.upper()}" in dsn
    out = psql(dsn, "select current_database(), current_setting('cluster_name', true) is not null")
    assert out.returncode == 0, out.stderr
    with psycopg.connect(conninfo(gateway.port, tls["ca"], "abc"), autocommit=True) as conn:
        conn.execute("create table marker as select 1 as x")
    assert psql(dsn, "select x from marker").stdout.strip() == "1"


def test_the_session_can_read_its_clients_address_and_tls(gateway, tls, caplog):
    """The backend sees a unix socket (inet_client_addr() is NULL, pg_stat_ssl says no TLS);
    what it cannot know comes as settings the client cannot forge, and the gateway's log line
    names the backend pid for pg_stat_activity."""
    import logging

    from gateway.wire import protocol as p

    from ..support.rawclient import RawClient

    gateway.create_db("app1")
    raw = RawClient(gateway.port)
    raw.start_tls(str(tls["ca"]), f"app1.{DOMAIN}")
    local_port = raw.sock.getsockname()[1]
    raw.startup({"user": "postgres", "database": "postgres", "pgsni.client_addr": "6.6.6.6",
                 "options": "-c pgsni.tls=forged"})
    raw.scram("postgres", TEST_PASSWORD)
    while not isinstance(raw.next_backend(), p.ReadyForQuery):
        pass
    with caplog.at_level(logging.INFO, logger="pgsni.session"):
        rows = raw.rows("select current_setting('pgsni.client_addr'), current_setting('pgsni.client_port'), "
                        "current_setting('pgsni.tls'), current_setting('pgsni.tls_version'), "
                        "current_setting('pgsni.server_name'), length(current_setting('pgsni.tls_cipher')) > 0, "
                        "pg_backend_pid()")
        raw.close()
        gateway.call(lambda: __import__("asyncio").sleep(0.5))
    assert rows[0][:6] == ["127.0.0.1", str(local_port), "on", "TLSv1.3", f"app1.{DOMAIN}", "t"]
    lines = [r for r in caplog.records if r.getMessage() == "connection closed"]
    assert lines and lines[-1].backend_pid == int(rows[0][6]) and lines[-1].client.endswith(f":{local_port}")
