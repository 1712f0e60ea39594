"""/v1/databases end to end against a real gateway and real Postgres: every route, its
success and its error codes (400, 401, 404, 409, 503), dry runs that change nothing."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from ..support.adminclient import AdminClient
from ..support.harness import conninfo, wait_until
from ..support.ports import free_port
from ..support.pginstalls import install

TOKEN = "api-test-token"


@pytest.fixture
def api(start_gateway):
    def start(**kw):
        gt = start_gateway(admin_port=free_port(), admin_token=TOKEN, **kw)
        return gt, AdminClient(gt.settings.admin_port, TOKEN)
    return start


def _connect(gt, tls, db_id, password):
    return psycopg.connect(conninfo(gt.port, tls["ca"], db_id, password=password), autocommit=True)


@pytest.mark.slow
def test_database_lifecycle_over_http(api, tls):
    gt, admin = api()
    # create: dry run changes nothing, then for real; the password comes back once
    plan = admin.post("/v1/databases?dry_run=true", {"id": "app1"})
    assert plan.status == 200 and plan.json()["dry_run"] is True and plan.json()["changes"]
    assert admin.get("/v1/databases/app1").status == 404
    created = admin.post("/v1/databases", {"id": "app1", "password": "pw-one-23"})
    assert created.status == 201, created.body
    body = created.json()
    assert body["id"] == "app1" and body["user"] == "postgres" and body["password"] == "pw-one-23"
    assert body["version"]  # the first version is stored
    assert admin.post("/v1/databases", {"id": "app1"}).status == 409
    generated = admin.post("/v1/databases", {"id": "app3"}).json()["password"]
    with _connect(gt, tls, "app3", generated) as conn:
        assert conn.execute("select 1").fetchone() == (1,)

    # list and info
    listed = admin.get("/v1/databases")
    assert listed.status == 200
    assert {"app1", "app3"} <= {d["id"] for d in listed.json()}
    info = admin.get("/v1/databases/app1").json()
    assert info["id"] == "app1" and info["stored"] and info["version"] == body["version"]
    assert [v["version"] for v in info["versions"]] == [body["version"]]

    # write, then snapshot with a stop (not an online base backup: tests/e2e/test_base_backups.py):
    # refused while a client is connected, saved once it is not
    saves = admin.metric("pgsni_snapshot_bytes_total", operation="save")
    with _connect(gt, tls, "app1", "pw-one-23") as conn:
        conn.execute("create table t (x int); insert into t values (1)")
        busy = admin.post("/v1/databases/app1/snapshot?stop=true")
        assert busy.status == 409 and busy.json()["error"] == "busy"
    wait_until(lambda: gt.gw.instances.instances["app1"].clients == 0, what="client gone")
    snap = admin.post("/v1/databases/app1/snapshot?stop=true")
    assert snap.status == 200, snap.body
    assert snap.json()["saved"] is True and snap.json()["stopped"] is True, snap.json()
    assert admin.metric("pgsni_snapshot_bytes_total", operation="save") > saves
    again = admin.post("/v1/databases/app1/snapshot").json()
    assert again["saved"] is False and again["version"] is None

    # versions, restore to the first: the table is gone; unknown version is 404
    versions = admin.get("/v1/databases/app1/versions").json()
    assert [v["version"] for v in versions] == [body["version"], snap.json()["version"]]
    assert [v["current"] for v in versions] == [False, True]
    assert admin.post("/v1/databases/app1/restore", {"version": "20000101T000000.000Z-000000"}).status == 404
    restored = admin.post("/v1/databases/app1/restore", {"version": body["version"]})
    assert restored.status == 200, restored.body
    # the version restored from (with WAL stored after it, a new version holds it)
    assert restored.json()["base"] == body["version"]
    with _connect(gt, tls, "app1", "pw-one-23") as conn:
        assert conn.execute("select to_regclass('t')").fetchone() == (None,)

    # fork the newer version into app2: same data and password
    forked = admin.post("/v1/databases/app1/fork", {"id": "app2", "version": snap.json()["version"]})
    assert forked.status == 201, forked.body
    assert forked.json()["source_version"] == snap.json()["version"]
    with _connect(gt, tls, "app2", "pw-one-23") as conn:
        assert conn.execute("select x from t").fetchone() == (1,)
    assert admin.post("/v1/databases/app1/fork", {"id": "app2"}).status == 409
    assert admin.post("/v1/databases/nope/fork", {"id": "app9"}).status == 404

    # delete: busy with a client (unless forced), then gone
    with _connect(gt, tls, "app2", "pw-one-23"):
        assert admin.delete("/v1/databases/app2").status == 409
    wait_until(lambda: gt.gw.instances.instances["app2"].clients == 0, what="client gone")
    assert admin.delete("/v1/databases/app2?dry_run=true").json()["dry_run"] is True
    deleted = admin.delete("/v1/databases/app2")
    assert deleted.status == 200, deleted.body
    assert deleted.json()["objects_removed"] > 0
    assert admin.get("/v1/databases/app2").status == 404
    assert admin.get("/v1/databases/app2/versions").status == 404
    assert admin.delete("/v1/databases/app2").status == 404


def test_request_errors_are_json_with_the_right_status(api):
    gt, admin = api()
    cases = [
        (admin.post("/v1/databases", {"id": "Bad_Id"}), 400),
        (admin.post("/v1/databases", {}), 400),
        (admin.post("/v1/databases", {"id": "app1", "colour": "red"}), 400),
        (admin.post("/v1/databases", {"id": 5}), 400),
        (admin.post("/v1/databases", raw=b"{not json"), 400),
        (admin.post("/v1/databases", ["app1"]), 400),
        (admin.post("/v1/databases?dry_run=maybe", {"id": "app1"}), 400),
        (admin.get("/v1/databases/nope"), 404),
        (admin.get("/v1/databases/nope/versions"), 404),
        (admin.get("/v1/databases/Bad_Id"), 400),
        (admin.post("/v1/databases/nope/snapshot"), 404),
        (admin.post("/v1/databases/nope/restore", {"version": "v"}), 404),
        (admin.post("/v1/databases/nope/restore", {}), 400),
        (admin.delete("/v1/databases/nope"), 404),
        (admin.get("/v1/databases", token="wrong"), 401),
    ]
    for reply, status in cases:
        assert reply.status == status, (reply.status, reply.body)
        assert set(reply.json()) >= {"error", "message"}
    assert admin.get("/v1/databases").json() == []  # nothing was created on the way


def test_storage_outage_is_503(api, s3_settings, s3_proxy):
    gt, admin = api(**s3_settings)
    assert admin.get("/v1/databases").status == 200
    s3_proxy.cut()
    try:
        reply = admin.get("/v1/databases")
        assert reply.status == 503, reply.body
        assert reply.json()["error"] == "unavailable"
    finally:
        s3_proxy.restore()
    assert admin.get("/v1/databases").status == 200


@pytest.mark.slow
def test_verify_and_password(api, tls):
    gt, admin = api()
    assert admin.post("/v1/databases", {"id": "app1", "password": "pw-first-1"}).status == 201
    verified = admin.post("/v1/databases/app1/verify")
    assert verified.status == 200, verified.body
    body = verified.json()
    assert body["ok"] is True and body["archive_ok"] and body["query_ok"] and body["problems"] == []
    assert admin.post("/v1/databases/nope/verify").status == 404
    changed = admin.post("/v1/databases/app1/password", {"password": "pw-second-2"})
    assert changed.status == 200, changed.body
    assert changed.json() == {"id": "app1", "role": "postgres", "password": "pw-second-2"}
    with _connect(gt, tls, "app1", "pw-second-2") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        _connect(gt, tls, "app1", "pw-first-1").close()
    generated = admin.post("/v1/databases/app1/password").json()["password"]
    assert len(generated) >= 16 and generated != "pw-second-2"
    assert admin.post("/v1/databases/app1/password", {"role": "nobody"}).status == 404
    assert admin.post("/v1/databases/app1/password", {"role": 7}).status == 400


def test_remote_routes_are_listed_with_their_address(api):
    gt, admin = api(remote_routes={"ext1": {"host": "127.0.0.1", "port": 5999, "sslmode": "disable"}})
    assert admin.post("/v1/databases", {"id": "app1"}).status == 201
    listed = admin.get("/v1/databases")
    assert listed.status == 200
    rows = {d["id"]: d for d in listed.json()}
    assert rows["app1"]["remote"] is None and rows["app1"]["stored"]
    assert rows["ext1"]["remote"] == "127.0.0.1:5999"
    assert not (rows["ext1"]["local"] or rows["ext1"]["stored"] or rows["ext1"]["running"])
    missing = admin.get("/v1/databases/ext1")
    assert missing.status == 404 and "127.0.0.1:5999" in missing.json()["message"], missing.body


def test_migrate_and_dump(api, tls, tmp_path):
    """POST /migrate applies pending scripts in version order (a dry run lists them, a re-run
    applies nothing, a failing one is a 400 that names the statement and keeps the ones before);
    GET /dump is a pg_dump that pg_restore reads and that holds the migrated table."""
    gt, admin = api()
    assert admin.post("/v1/databases", {"id": "app1", "password": "pw-first-1"}).status == 201
    scripts = {"V2__fill.sql": "insert into items values (1), (2);",
               "V1__items.sql": "create table items(id int primary key);"}
    dry = admin.post("/v1/databases/app1/migrate?dry_run=1", {"migrations": scripts})
    assert dry.status == 200, dry.body
    assert dry.json()["pending"] == ["1", "2"] and dry.json()["ran"] == []
    ran = admin.post("/v1/databases/app1/migrate", {"migrations": scripts})
    assert ran.status == 200, ran.body
    assert [r["script"] for r in ran.json()["ran"]] == ["V1__items.sql", "V2__fill.sql"]
    again = admin.post("/v1/databases/app1/migrate", {"migrations": scripts}).json()
    assert again["applied_before"] == ["1", "2"] and again["pending"] == [] and again["ran"] == []
    failing = admin.post("/v1/databases/app1/migrate", {"migrations": scripts | {
        "V3__more.sql": "insert into items values (3);", "V4__bad.sql": "insert into items values (1);"}})
    assert failing.status == 400 and failing.json()["error"] == "invalid", failing.body
    assert "V4__bad.sql:1:" in failing.json()["message"] and "duplicate key" in failing.json()["message"]
    assert "pgsni-migrate-" not in failing.json()["message"]  # no private spool path
    with _connect(gt, tls, "app1", "pw-first-1") as conn:
        assert conn.execute("select array_agg(id order by id) from items").fetchone()[0] == [1, 2, 3]
    for bad in ({"migrations": {}}, {"migrations": {"../V5__x.sql": "select 1"}},
                {"migrations": {"V5__x.sql": 5}}, {"migrations": "V5__x.sql"}, {}):
        reply = admin.post("/v1/databases/app1/migrate", bad)
        assert reply.status == 400 and reply.json()["error"] == "invalid", (bad, reply.body)
    edited = admin.post("/v1/databases/app1/migrate",
                        {"migrations": {"V1__items.sql": "create table items(id bigint);"}})
    assert edited.status == 400 and "V1__items.sql" in edited.json()["message"], edited.body
    assert admin.post("/v1/databases/nope/migrate", {"migrations": scripts}).status == 404

    dumped = admin.get("/v1/databases/app1/dump")
    assert dumped.status == 200, dumped.body
    assert dumped.headers["Content-Disposition"] == 'attachment; filename="app1.dump"'
    assert dumped.body[:5] == b"PGDMP" and int(dumped.headers["Content-Length"]) == len(dumped.body)
    (tmp_path / "app1.dump").write_bytes(dumped.body)
    listing = subprocess.run([str(install().bindir / "pg_restore"), "--list", str(tmp_path / "app1.dump")],
                             capture_output=True, text=True)
    assert listing.returncode == 0 and "TABLE public items" in listing.stdout, listing.stderr
    plain = admin.get("/v1/databases/app1/dump?format=plain&no_owner=1")
    assert plain.status == 200 and plain.headers["Content-Type"].startswith("application/sql")
    assert b"CREATE TABLE public.items" in plain.body and b"OWNER TO" not in plain.body
    assert admin.get("/v1/databases/app1/dump?format=zip").status == 400
    assert admin.get("/v1/databases/app1/dump?database=nosuch").json()["error"] == "failed"
    assert admin.get("/v1/databases/nope/dump").status == 404
    assert not list(Path(tempfile.gettempdir()).glob("pgsni-dump-*"))  # nothing left behind


def test_dump_database_parameter_is_a_name_not_a_connection_string(api, tls):
    """`?database=` names a database of this id: a connection string there (host=, a URI)
    must not point pg_dump at another tenant's socket."""
    gt, admin = api()
    for db_id in ("app1", "victim"):
        assert admin.post("/v1/databases", {"id": db_id, "password": "pw-12345678"}).status == 201
    with _connect(gt, tls, "victim", "pw-12345678") as conn:
        conn.execute("create table only_in_victim (secret text)")
    with _connect(gt, tls, "app1", "pw-12345678"):
        pass  # both running: the victim's socket is live
    victim_socket = gt.gw.instances.instances["victim"].socket_dir
    for database in (f"host={victim_socket} dbname=postgres", f"postgresql:///postgres?host={victim_socket}"):
        dumped = admin.get("/v1/databases/app1/dump?format=plain&database=" +
                           __import__("urllib.parse").parse.quote(database))
        assert b"only_in_victim" not in dumped.body
        assert dumped.status != 200 and "does not exist" in dumped.json()["message"], dumped.body
