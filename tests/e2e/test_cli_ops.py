"""The database lifecycle commands end to end (`pgsni db create --init/--owner`, info, fork,
verify, password, --dry-run), as a real executable against real Postgres, a real gateway and
both local storage and a moto S3 server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psycopg
import pytest

from gateway.compute.pgbins import PgInstalls

from ..support.harness import conninfo, postmasters, psql
from ..support.moto import ACCESS_KEY, SECRET_KEY
from .test_cli import cli  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


class Store:
    """Where the CLI and the gateway keep versions in one test: env for the CLI, settings for
    a gateway, and a view of every stored object (for "nothing changed" checks)."""

    def __init__(self, kind: str, data_root: Path, moto=None) -> None:
        self.kind = kind
        self.env: dict[str, str] = {}
        self.settings: dict = {}
        if kind == "local":
            self.root = data_root / "_storage"
        else:
            self.moto = moto
            self.bucket = moto.create_bucket()
            self.settings = dict(storage="s3", s3_bucket=self.bucket, s3_prefix="pgsni/",
                                 s3_endpoint=moto.endpoint_url, s3_region="us-east-1",
                                 s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY)
            self.env = {f"PGSNI_{k.upper()}": str(v) for k, v in self.settings.items()}

    def objects(self) -> dict[str, tuple]:
        if self.kind == "local":
            if not self.root.exists():
                return {}
            return {str(p.relative_to(self.root)): (p.stat().st_size, p.stat().st_mtime_ns)
                    for p in self.root.rglob("*") if p.is_file()}
        c = self.moto.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for o in page.get("Contents", []):
                out[o["Key"].removeprefix("pgsni/")] = (o["Size"], o["ETag"])
        return out

    def read(self, key: str) -> bytes:
        if self.kind == "local":
            return (self.root / key).read_bytes()
        return self.moto.client().get_object(Bucket=self.bucket, Key="pgsni/" + key)["Body"].read()

    def corrupt(self, key: str) -> None:
        """Flip bytes in the middle of an object (same size)."""
        data = bytearray(self.read(key))
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
        if self.kind == "local":
            path = self.root / key
            os.chmod(path, 0o600)
            path.write_bytes(bytes(data))
        else:
            self.moto.client().put_object(Bucket=self.bucket, Key="pgsni/" + key, Body=bytes(data))


@pytest.fixture(params=["local", "s3"])
def store(request, data_root):
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    return Store(request.param, data_root, moto)


@pytest.fixture
def run(cli, store):
    """`pgsni --json ARGS` against `store`, parsed; asserts success unless told otherwise."""

    def go(*args: str, ok: bool = True, raw: bool = False, env: dict | None = None):
        out = cli(*args, extra_env=store.env | (env or {}))
        if ok:
            assert out.returncode == 0, f"{args}: {out.stderr}"
        return json.loads(out.stdout) if ok and not raw and "--json" in args else out

    return go


def _tree(root: Path) -> dict[str, tuple]:
    """Every file and directory under root with size and mtime: a change shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _sql(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_create_with_init_files_and_owner(run, store, start_gateway, tls, tmp_path, data_root):
    first = _sql(tmp_path, "001_schema.sql", "create table notes(id int primary key, body text);\n"
                                             "create view note_count as select count(*) from notes;\n")
    second = _sql(tmp_path, "002_data.sql", "insert into notes values (1, 'one'), (2, 'two');\n")
    made = run("--json", "db", "create", "app1", "--init", first, "--init", second, "--owner", "app")
    assert made["owner"] == "app" and len(made["owner_password"]) >= 16
    assert made["statements"] == 3 and made["version"]
    assert postmasters(data_root / "app1" / "pgdata") == []

    gw = start_gateway(**store.settings)
    owner_dsn = conninfo(gw.port, tls["ca"], "app1", user="app", password=made["owner_password"])
    with psycopg.connect(owner_dsn) as conn:
        assert conn.execute("select body from notes order by id").fetchall() == [("one",), ("two",)]
        owners = conn.execute("select tableowner from pg_tables where tablename = 'notes' union all "
                              "select viewowner from pg_views where viewname = 'note_count' union all "
                              "select pg_get_userbyid(datdba) from pg_database where datname = 'postgres' "
                              "union all select nspowner::regrole::text from pg_namespace "
                              "where nspname = 'public'").fetchall()
        assert owners == [("app",)] * 4
        assert conn.execute("select rolsuper from pg_roles where rolname = 'app'").fetchone() == (False,)
    bad = psql(conninfo(gw.port, tls["ca"], "app1", user="app", password="wrong"), "select 1")
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr


def test_init_syntax_error_is_placed_and_creates_nothing(run, store, tmp_path, data_root):
    good = _sql(tmp_path, "ok.sql", "create table a(x int);\n")
    bad = _sql(tmp_path, "bad.sql", "create table b(x int);\n\nselect * fromm b;\n")
    before = store.objects()
    out = run("db", "create", "app1", "--init", good, "--init", bad, ok=False)
    assert out.returncode != 0
    assert f"{bad}:3:" in out.stderr and "syntax error" in out.stderr
    assert not (data_root / "app1").exists()
    assert store.objects() == before
    assert postmasters(data_root / "app1" / "pgdata") == []


def test_init_runtime_error_removes_the_new_database(run, store, tmp_path, data_root):
    bad = _sql(tmp_path, "fails.sql", "create table a(x int);\ninsert into missing values (1);\n")
    out = run("db", "create", "app1", "--init", bad, ok=False)
    assert out.returncode != 0
    assert f"{bad}:2:" in out.stderr and "missing" in out.stderr
    assert not (data_root / "app1").exists()
    assert not any(k.startswith("dbs/app1/") for k in store.objects())
    assert run("--json", "db", "list") == []


def test_password_rotation_through_a_real_gateway(run, store, start_gateway, tls, data_root):
    old = run("--json", "db", "create", "app1")["password"]
    gw = start_gateway(**store.settings)
    # the gateway is up but has not woken app1: the CLI may change it
    rotated = run("--json", "db", "password", "app1")
    assert rotated["role"] == "postgres" and rotated["password"] != old
    new = rotated["password"]
    ok = psql(conninfo(gw.port, tls["ca"], "app1", password=new), "select current_user")
    assert ok.returncode == 0, ok.stderr
    refused = psql(conninfo(gw.port, tls["ca"], "app1", password=old), "select 1")
    assert refused.returncode != 0 and "password authentication failed" in refused.stderr

    # now the gateway runs app1: the CLI refuses, the gateway's own operations do it live
    busy = run("db", "password", "app1", ok=False)
    assert busy.returncode != 0 and "in use" in busy.stderr
    from gateway.ops.operations import Ops

    g = gw.gw
    ops = Ops(gw.settings, g.catalog, g.databases, g.instances)
    live = gw.call(lambda: ops.set_password("app1", password="live-secret-1"))
    assert live.password == "live-secret-1"
    assert psql(conninfo(gw.port, tls["ca"], "app1", password="live-secret-1"), "select 1").returncode == 0
    assert psql(conninfo(gw.port, tls["ca"], "app1", password=new), "select 1").returncode != 0
    gw.stop()

    # the stored manifest carries it too: a cold start from storage accepts only the newest
    shutil.rmtree(data_root / "app1")
    gw = start_gateway(**store.settings)
    assert psql(conninfo(gw.port, tls["ca"], "app1", password=new), "select 1").returncode != 0
    assert psql(conninfo(gw.port, tls["ca"], "app1", password="live-secret-1"), "select 1").returncode == 0


def test_password_for_unknown_role_or_database(run):
    run("db", "create", "app1")
    out = run("db", "password", "app1", "--role", "nobody", ok=False)
    assert out.returncode != 0 and 'has no role "nobody"' in out.stderr
    out = run("db", "password", "nope", ok=False)
    assert out.returncode != 0 and 'database "nope" does not exist' in out.stderr


def test_fork_is_independent_and_copies_inside_storage(run, store, start_gateway, tls, tmp_path):
    init = _sql(tmp_path, "init.sql", "create table t(v text);\ninsert into t values ('v1');\n")
    password = run("--json", "db", "create", "src", "--init", init)["password"]
    v1 = run("--json", "db", "versions", "src")[0]["version"]
    gw = start_gateway(**store.settings)
    assert psql(conninfo(gw.port, tls["ca"], "src", password=password),
                "insert into t values ('v2')").returncode == 0
    gw.stop()  # saves src's second version

    forked = run("--json", "db", "fork", "src", "new")
    assert forked["source"] == "src" and forked["source_version"] != v1
    old = run("--json", "db", "fork", "src", "old", "--version", v1)
    assert old["source_version"] == v1
    objects = store.objects()
    src_archive = f"dbs/src/versions/{forked['source_version']}.tar.zst"
    new_archive = f"dbs/new/versions/{forked['version']}.tar.zst"
    assert objects[new_archive][0] == objects[src_archive][0]
    assert store.read(new_archive) == store.read(src_archive)
    if store.kind == "local":  # a hard link: the bytes were not copied, let alone downloaded
        assert os.stat(store.root / new_archive).st_ino == os.stat(store.root / src_archive).st_ino
    manifest = json.loads(store.read(f"dbs/new/versions/{forked['version']}.json"))
    assert manifest["db_id"] == "new" and manifest["archive"]["key"] == new_archive

    gw = start_gateway(**store.settings)
    new_dsn = conninfo(gw.port, tls["ca"], "new", password=password)  # same roles as src
    with psycopg.connect(new_dsn) as conn:
        assert conn.execute("select v from t order by v").fetchall() == [("v1",), ("v2",)]
        conn.execute("insert into t values ('only in new')")
        conn.commit()
    with psycopg.connect(conninfo(gw.port, tls["ca"], "src", password=password)) as conn:
        assert conn.execute("select v from t order by v").fetchall() == [("v1",), ("v2",)]
    with psycopg.connect(conninfo(gw.port, tls["ca"], "old", password=password)) as conn:
        assert conn.execute("select v from t").fetchall() == [("v1",)]

    taken = run("db", "fork", "src", "new", ok=False)
    assert taken.returncode != 0 and 'database "new" already exists' in taken.stderr


def test_verify_passes_then_detects_a_corrupted_archive(run, store, data_root):
    run("db", "create", "app1")
    good = run("--json", "db", "verify", "app1")
    assert good["ok"] and good["archive_ok"] and good["started"] and good["query_ok"]
    assert good["files_checked"] > 100
    human = run("db", "verify", "app1", raw=True)
    assert "SELECT 1: ok" in human.stdout

    store.corrupt(f"dbs/app1/versions/{good['version']}.tar.zst")
    bad = run("--json", "db", "verify", "app1", ok=False)
    assert bad.returncode == 1
    result = json.loads(bad.stdout)
    assert result["ok"] is False and result["archive_ok"] is False
    assert any("damaged" in p for p in result["problems"])
    assert not list(data_root.glob(".verify-*"))  # the scratch copy is gone


def test_info_reports_size_versions_and_connections(run, store, start_gateway, tls, data_root):
    password = run("--json", "db", "create", "app1")["password"]
    info = run("--json", "db", "info", "app1")
    assert info["local"] and info["stored"] and not info["running"]
    assert info["connections"] == 0 and info["local_bytes"] > 1 << 20
    assert info["stored_bytes"] > 0 and len(info["versions"]) == 1
    assert info["version"] == info["local_version"] == info["versions"][0]["version"]
    assert info["last_used"] and info["pg_major"] == PgInstalls().default_major

    gw = start_gateway(**store.settings)
    with psycopg.connect(conninfo(gw.port, tls["ca"], "app1", password=password)):
        live = run("--json", "db", "info", "app1",
                   env={"PGSNI_SOCKET_DIR": str(gw.settings.socket_path)})
        assert live["running"] is True and live["connections"] == 1
    missing = run("db", "info", "nope", ok=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_dry_run_changes_nothing(run, store, tmp_path, data_root):
    init = _sql(tmp_path, "init.sql", "create table t(x int);\n")
    run("db", "create", "app1", "--init", init)
    version = run("--json", "db", "versions", "app1")[0]["version"]
    disk, stored = _tree(data_root), store.objects()

    plans = [
        run("--dry-run", "--json", "db", "create", "app2", "--init", init, "--owner", "app"),
        run("--dry-run", "--json", "db", "delete", "app1", "--yes"),
        run("--dry-run", "--json", "db", "fork", "app1", "app3"),
        run("--dry-run", "--json", "db", "snapshot", "app1"),
        run("--dry-run", "--json", "db", "restore", "app1", "--version", version),
        run("--dry-run", "--json", "db", "password", "app1"),
        run("--dry-run", "--json", "db", "verify", "app1"),
    ]
    assert all(p["dry_run"] is True and p["changes"] for p in plans)
    assert any("init.sql" in c for c in plans[0]["changes"])
    human = run("--dry-run", "db", "delete", "app1", raw=True)
    assert "would" in human.stdout and "nothing was changed" in human.stdout
    assert _tree(data_root) == disk
    assert store.objects() == stored
    assert [r["id"] for r in run("--json", "db", "list")] == ["app1"]

    # a dry run still refuses what the real command would refuse
    assert run("--dry-run", "db", "create", "app1", ok=False).returncode != 0
    assert run("--dry-run", "db", "restore", "app1", "--version", "19990101T000000.000Z-000000",
               ok=False).returncode != 0


def test_delete_removes_local_copy_and_storage(run, store, data_root):
    run("db", "create", "app1")
    assert any(k.startswith("dbs/app1/") for k in store.objects())
    gone = run("--json", "db", "delete", "app1", "--yes")
    assert gone["local_removed"] and gone["objects_removed"] >= 3
    assert not (data_root / "app1").exists()
    assert not any(k.startswith("dbs/app1/") for k in store.objects())
