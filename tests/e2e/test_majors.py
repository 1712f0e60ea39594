"""Postgres majors side by side: a database made on 15 and one on 18 run behind one gateway,
each with its own binaries; pgvector works for the tenant on 18 (an HNSW nearest-neighbour
query); `db upgrade` moves a database from 15 to 18, all or nothing, keeping the version
before in storage."""

from __future__ import annotations

import json

import psycopg
import pytest

from ..support.harness import conninfo, psql
from ..support.pginstalls import install, installs
from .test_cli import _password, cli  # noqa: F401  (the `cli` fixture)

pytestmark = pytest.mark.skipif(not {"15", "18"} <= set(installs().by_major),
                                reason="needs Postgres 15 and 18 installed (./dev setup)")


def _connect(gw, tls, db_id, password):
    return psycopg.connect(conninfo(gw.port, tls["ca"], db_id, password=password), autocommit=True)


def _created(cli, db_id: str, *args: str) -> str:
    out = cli("db", "create", db_id, *args)
    assert out.returncode == 0, out.stderr
    return _password(out.stdout)


def test_15_and_18_side_by_side(cli, start_gateway, tls, data_root):
    old, new = _created(cli, "old15", "--pg", "15"), _created(cli, "new18")  # 18 is the default
    gw = start_gateway()
    with _connect(gw, tls, "old15", old) as a, _connect(gw, tls, "new18", new) as b:
        assert a.info.parameter_status("server_version").startswith("15.")
        assert b.info.parameter_status("server_version").startswith("18.")
        # each runs its own major's postmaster: the binaries the gateway was given for it
        assert _cmdline(gw, "old15")[0] == str(install("15").bindir / "postgres")
        assert _cmdline(gw, "new18")[0] == str(install("18").bindir / "postgres")
        # the tenant role has CREATEROLE only where it cannot grant itself more (16 and later)
        assert a.execute("select rolcreaterole from pg_roles where rolname = 'postgres'").fetchone() == (False,)
        assert b.execute("select rolcreaterole from pg_roles where rolname = 'postgres'").fetchone() == (True,)
        b.execute("create role reader login password 'reader-pw-123'")  # a tenant on 18 manages roles
    info = json.loads(cli("--json", "db", "info", "old15").stdout)
    assert info["pg_major"] == "15"
    refused = cli("db", "create", "x", "--pg", "14")
    assert refused.returncode != 0 and "Postgres 14 is not installed here (installed: 15, 18)" in refused.stderr


def _cmdline(gw, db_id: str) -> list[str]:
    pid = gw.gw.instances.instances[db_id].process.pid
    return open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")


def test_pgvector_nearest_neighbours_with_an_hnsw_index(start_gateway, tls):
    gw = start_gateway()
    gw.create_db("vec", major="18")
    gw.create_db("novec", major="15")
    with _connect(gw, tls, "vec", "s3cret-test-pw") as conn:
        conn.execute("create extension vector")  # the tenant, not a superuser: allow-listed
        assert conn.execute("select extowner::regrole::text from pg_extension where extname = 'vector'"
                            ).fetchone() == ("postgres",)
        conn.execute("create table items (id int primary key, embedding vector(3))")
        conn.execute("insert into items select i, array[i, i * 2, 100 - i]::vector "
                     "from generate_series(1, 500) i")
        conn.execute("create index on items using hnsw (embedding vector_l2_ops)")
        conn.execute("set enable_seqscan = off")
        query = "select id from items order by embedding <-> '[10.3, 20, 90]' limit 3"
        plan = "\n".join(r[0] for r in conn.execute("explain " + query).fetchall())
        assert "items_embedding_idx" in plan, plan
        assert [r[0] for r in conn.execute(query).fetchall()] == [10, 11, 9]
    with _connect(gw, tls, "novec", "s3cret-test-pw") as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="is not available"):
            conn.execute("create extension vector")  # 15 here has no pgvector at all


@pytest.mark.slow
def test_db_upgrade_from_15_to_18(cli, start_gateway, tls, data_root):
    password = _created(cli, "up1", "--pg", "15")
    gw = start_gateway()
    with _connect(gw, tls, "up1", password) as conn:
        conn.execute("create table t as select g as x, md5(g::text) as m from generate_series(1, 2000) g")
        conn.execute("create index on t (m)")
        conn.execute("create extension citext")
    gw.stop()
    before = cli("db", "versions", "up1").stdout.splitlines()
    dry = cli("--dry-run", "db", "upgrade", "up1", "--to", "18")
    assert dry.returncode == 0 and "pg_upgrade a copy to Postgres 18" in dry.stdout
    assert cli("db", "versions", "up1").stdout.splitlines() == before  # the dry run stored nothing
    out = cli("db", "upgrade", "up1", "--to", "18", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "up1: Postgres 15 -> 18, stored as version" in out.stdout
    after = cli("db", "versions", "up1").stdout.splitlines()
    assert len(after) == len(before) + 1 and after[-1].endswith("current")
    gw = start_gateway()
    with _connect(gw, tls, "up1", password) as conn:  # the same password
        assert conn.info.parameter_status("server_version").startswith("18.")
        assert conn.execute("select count(*), count(distinct m) from t").fetchone() == (2000, 2000)
        assert conn.execute("select 'A'::citext = 'a'").fetchone() == (True,)
        assert conn.execute("select rolcreaterole, rolsuper from pg_roles where rolname = 'postgres'"
                            ).fetchone() == (True, False)  # secured for 18
    gw.stop()
    again = cli("db", "upgrade", "up1", "--to", "15")
    assert again.returncode != 0 and "upgrade goes to a newer major" in again.stderr


def test_a_failed_upgrade_changes_nothing(cli, start_gateway, tls, data_root):
    """pgcrypto is in Debian's 15 but not in the embedded 18: pg_upgrade refuses, and the
    database stays on 15, serving, with no new version."""
    if "pgcrypto" not in _available(install("15")) or "pgcrypto" in _available(install("18")):
        pytest.skip("needs pgcrypto on 15 and not on 18")
    password = _created(cli, "up2", "--pg", "15")
    gw = start_gateway()
    with _connect(gw, tls, "up2", password) as conn:
        conn.execute("create extension pgcrypto")
        conn.execute("create table t as select digest('x', 'sha256') as d")
    gw.stop()
    before = cli("db", "versions", "up2").stdout.splitlines()
    out = cli("db", "upgrade", "up2", "--to", "18", timeout=300)
    assert out.returncode != 0
    assert 'database "up2" was not changed' in out.stderr and "pgcrypto" in out.stderr, out.stderr
    assert cli("db", "versions", "up2").stdout.splitlines() == before
    assert not list(data_root.glob(".upgrade-*"))
    gw = start_gateway()
    out = psql(conninfo(gw.port, tls["ca"], "up2", password=password), "show server_version")
    assert out.returncode == 0 and out.stdout.startswith("15."), out.stderr


def _available(install) -> set[str]:
    return {p.stem for p in (install.sharedir / "extension").glob("*.control")}
