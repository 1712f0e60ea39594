"""`pgsni db upload | dump | migrate` driven as the real console script, with real Postgres,
pg_dump/pg_restore/psql, local storage and a moto S3 server; data is read back through a real
gateway with psql. Every refusal is checked to have changed nothing."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from ..support.harness import conninfo, postmasters, psql
from ..support.moto import ACCESS_KEY, SECRET_KEY
from .test_cli import _password, cli  # noqa: F401  (the `cli` fixture)
from .test_create_from import APP_PW, ROWS, ROWS_OK, _small_tar, archives  # noqa: F401

pytestmark = pytest.mark.slow

SQL_V1 = """-- a hand-written script
create table items (id int primary key, name text not null);
insert into items select g, 'item ' || g from generate_series(1, 50) g;
create function double_it(x int) returns int language sql as $$ select x * 2; $$;
"""
SQL_V2 = "create table other (v text);\ninsert into other values ('second');\n"


def _versions(cli, db_id: str, extra_env=None) -> list[dict]:
    out = cli("--json", "db", "versions", db_id, extra_env=extra_env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _query(start_gateway, tls, db_id: str, password: str, sql: str, user: str = "postgres",
           **settings) -> str:
    gw = start_gateway(**settings)
    try:
        got = psql(conninfo(gw.port, tls["ca"], db_id, user=user, password=password), sql)
        assert got.returncode == 0, got.stderr
        return got.stdout.strip()
    finally:
        gw.stop()


def _state(data_root: Path) -> tuple:
    """What a refused upload must not change: the data root's entries and every stored object
    (local storage lives in <data_root>/_storage), with the current-version pointers' contents."""
    store = data_root / "_storage"
    # (WAL a running gateway ships meanwhile is not the upload's doing)
    objects = sorted(str(p.relative_to(store)) for p in store.rglob("*")
                     if p.is_file() and "wal" not in p.relative_to(store).parts)
    pointers = {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("current.json")}
    return sorted(p.name for p in data_root.iterdir()), objects, pointers


def _upload(cli, db_id: str, path: Path, *extra: str, extra_env=None):
    out = cli("db", "upload", db_id, str(path), *extra, extra_env=extra_env)
    assert out.returncode == 0, out.stderr
    return out


# --- upload: the three formats, replace, round trip ------------------------------------------
def test_upload_plain_then_replace_with_custom_dump_keeps_old_versions(cli, start_gateway, tls,
                                                                       data_root, tmp_path):
    script = tmp_path / "app.sql"
    script.write_text(SQL_V1)
    out = _upload(cli, "app1", script)
    assert 'created database "app1" from a plain SQL dump' in out.stdout
    password = _password(out.stdout)
    assert postmasters(data_root / "app1" / "pgdata") == []
    assert not [p for p in data_root.iterdir() if p.name.startswith(".upload-")]
    first = _versions(cli, "app1")
    assert len(first) == 1 and first[0]["current"]
    assert _query(start_gateway, tls, "app1", password,
                  "select count(*), double_it(max(id)) from items") == "50|100"

    # a custom-format dump of it, then replace the database with something else
    dump = tmp_path / "app1.dump"
    got = cli("db", "dump", "app1", str(dump))
    assert got.returncode == 0, got.stderr
    assert dump.read_bytes()[:5] == b"PGDMP"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # written atomically
    other = tmp_path / "other.sql"
    other.write_text(SQL_V2)
    refused = cli("db", "upload", "app1", str(other))  # no --yes, no one to answer
    assert refused.returncode != 0 and "Replace database" in refused.stderr
    assert _versions(cli, "app1") == first
    replaced = _upload(cli, "app1", other, "--yes")
    assert 'replaced database "app1"' in replaced.stdout
    assert "password" not in replaced.stdout  # the replaced database's password is kept
    assert f"kept as version {first[0]['version']}" in replaced.stderr
    second = _versions(cli, "app1")
    assert [v["version"] for v in second[:-1]] == [first[0]["version"]] and second[-1]["current"]
    assert _query(start_gateway, tls, "app1", password,
                  "select to_regclass('items') is null, (select v from other)") == "t|second"

    # the dump brings the first state back (pg_restore into a fresh database)
    back = _upload(cli, "app1", dump, "--yes")
    assert "from a pg_dump custom-format dump" in back.stdout
    assert len(_versions(cli, "app1")) == 3
    assert _query(start_gateway, tls, "app1", password,
                  "select count(*), to_regclass('other') is null from items") == "50|t"
    # and the replaced state can be restored from storage
    assert cli("db", "restore", "app1", "--version", second[-1]["version"]).returncode == 0
    assert _query(start_gateway, tls, "app1", password, "select v from other") == "second"


def test_upload_pgdata_archive_and_dump_round_trip_on_s3(cli, start_gateway, tls, data_root,
                                                         tmp_path, archives, moto_server):
    bucket = moto_server.create_bucket()
    s3 = dict(storage="s3", s3_bucket=bucket, s3_prefix="pgsni/", s3_endpoint=moto_server.endpoint_url,
              s3_region="us-east-1", s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY)
    env = {f"PGSNI_{k.upper()}": v for k, v in s3.items()}

    out = _upload(cli, "imp1", archives["running.tar.zst"], "--password", "chosen-pw", extra_env=env)
    assert "from a PGDATA archive (tar.zst)" in out.stdout
    assert "chosen-pw" in out.stdout
    stored = moto_server.client().list_objects_v2(Bucket=bucket, Prefix="pgsni/dbs/imp1/")
    assert any(o["Key"].endswith(".tar.zst") for o in stored.get("Contents", []))
    assert _query(start_gateway, tls, "imp1", "chosen-pw", ROWS, **s3) == ROWS_OK
    # the archive's own roles keep their passwords
    assert _query(start_gateway, tls, "imp1", APP_PW, ROWS, user="app", **s3) == ROWS_OK

    # plain dump -> upload as a new database: same rows. A dump holds no roles, so its GRANT
    # to role app fails in a new database, with a hint, and creates nothing
    plain = tmp_path / "imp1.sql"
    shutil.rmtree(data_root / "imp1")  # dump restores it from S3 first
    got = cli("db", "dump", "imp1", str(plain), "--format", "plain", extra_env=env)
    assert got.returncode == 0, got.stderr
    assert "GRANT SELECT ON TABLE public.t TO app" in plain.read_text()
    refused = cli("db", "upload", "copy1", str(plain), extra_env=env)
    assert refused.returncode != 0
    assert 'role "app" does not exist' in refused.stderr and "--no-owner" in refused.stderr
    got = cli("db", "dump", "imp1", str(plain), "--format", "plain", "--no-owner",
              "--no-privileges", extra_env=env)
    assert got.returncode == 0, got.stderr
    assert "GRANT" not in plain.read_text()
    copy = _upload(cli, "copy1", plain, extra_env=env)
    password = _password(copy.stdout)
    assert _query(start_gateway, tls, "copy1", password, ROWS, **s3) == ROWS_OK
    listed = cli("db", "list", extra_env=env)
    assert listed.stdout.split() == ["copy1", "local+stored", "imp1", "local+stored"]
    assert len(_versions(cli, "copy1", extra_env=env)) == 1


def test_upload_tar_format_dump_and_kind_from_content(cli, start_gateway, tls, tmp_path):
    script = tmp_path / "a.sql"
    script.write_text(SQL_V1)
    password = _password(_upload(cli, "src1", script).stdout)
    tar = tmp_path / "src1.tar"
    assert cli("db", "dump", "src1", str(tar), "--format", "tar").returncode == 0
    up = _upload(cli, "src2", tar, "--password", password)
    assert "from a pg_dump tar-format dump" in up.stdout
    assert _query(start_gateway, tls, "src2", password, "select count(*) from items") == "50"
    # a tar-format dump extracted is a directory-format dump: refused (its table of contents
    # could name any file on the machine; tests/security/test_privileged_paths.py)
    directory = tmp_path / "src1.dir"
    with tarfile.open(tar) as t:
        t.extractall(directory, filter="data")
    refused = cli("db", "upload", "src4", str(directory), "--password", password)
    assert refused.returncode != 0 and "pg_restore -f dump.sql src1.dir" in refused.stderr, refused.stderr
    # the kind comes from the content, not from the file's name
    misnamed = tmp_path / "backup.tar.zst"
    assert cli("db", "dump", "src1", str(misnamed), "--format", "plain").returncode == 0
    up = _upload(cli, "src3", misnamed, "--password", password)
    assert "from a plain SQL dump" in up.stdout
    assert _query(start_gateway, tls, "src3", password, "select double_it(21)") == "42"


# --- refusals change nothing -----------------------------------------------------------------------
def _bad_inputs(tmp_path: Path, dump: Path) -> dict[str, tuple[Path, str]]:
    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return {
        "truncated-dump": (write("t.dump", dump.read_bytes()[:600]), "pg_restore: error"),
        "random-bytes": (write("r.bin", bytes(range(256)) * 4), "is not something pgsni can load"),
        "empty": (write("e.sql", b""), "is empty"),
        "syntax-error": (write("s.sql", b"create table z (a int);\n\nselect * frm z;\n"),
                         's.sql:3:10: syntax error at or near "frm"'),
        "failing-statement": (write("f.sql", b"create table z (a int);\ninsert into z values (1/0);\n"),
                              "f.sql:2: ERROR:  division by zero"),
        "gzip-sql": (write("g.sql.gz", gzip.compress(SQL_V1.encode())), "decompress it first"),
        "tar-without-pgdata": (_small_tar(tmp_path / "n.tar", {"hello.txt": b"hi"}),
                               "no PG_VERSION"),
        "untrusted-routine": (None, "routine public.evil(integer) in language internal"),
    }


@pytest.mark.timeout(400)
def test_bad_inputs_leave_new_and_existing_databases_untouched(cli, start_gateway, tls, data_root,
                                                                tmp_path, archives):
    script = tmp_path / "app.sql"
    script.write_text(SQL_V1)
    password = _password(_upload(cli, "app1", script).stdout)
    dump = tmp_path / "app1.dump"
    assert cli("db", "dump", "app1", str(dump)).returncode == 0
    cases = _bad_inputs(tmp_path, dump)
    cases["untrusted-routine"] = (archives["untrusted.tar"], cases["untrusted-routine"][1])
    before = _state(data_root)
    assert before[1]  # the state compared holds app1's stored version
    for name, (path, expect) in cases.items():
        for db_id, extra in (("new1", ()), ("app1", ("--yes",))):
            out = cli("db", "upload", db_id, str(path), *extra)
            assert out.returncode != 0, (name, db_id, out.stdout)
            assert expect in out.stderr, (name, out.stderr)
            assert "Traceback" not in out.stderr
            assert _state(data_root) == before, (name, db_id)
    assert cli("db", "list").stdout.split() == ["app1", "local+stored"]
    assert _query(start_gateway, tls, "app1", password, "select count(*) from items") == "50"


def _meta_scripts(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Plain scripts whose psql meta-commands would run as the gateway's OS user (psql is the
    gateway's client, not the instance's server): a shell, a client-side file read (the admin
    token, a storage key file), a connection to another socket as the peer-mapped superuser."""
    def write(name: str, data: str) -> Path:
        (tmp_path / name).write_text(data)
        return tmp_path / name
    shell = f"\\! touch {marker}\n"
    return {
        "shell": (write("sh.sql", f"create table z (a int);\n{shell}"), "psql meta-command"),
        "copy-from-file": (write("cp.sql", f"create table z (a text);\n\\copy z from '{marker.parent / 'secret'}'\n"),
                           "psql meta-command"),
        "connect": (write("cn.sql", "\\connect postgres\nselect 1;\n"), "psql meta-command"),
        # past the parse check's size limit, so only psql reads it: a meta-command after SQL on
        # one line is a meta-command to psql too
        "shell-mid-line-big": (write("big.sql", f"select 1 \\! touch {marker}\n" + ("-- pad\n" * (10 << 20))),
                               "backslash commands are restricted"),
    }


def test_psql_meta_commands_in_an_uploaded_script_never_run(cli, data_root, tmp_path):
    """psql runs a plain script as the gateway's own OS user (root in a container), so a
    meta-command in an uploaded dump (`\\!`, `\\copy ... from 'file'`, `\\connect` to another
    socket, where the gateway's user logs in as the superuser by peer authentication) reached
    the host, the gateway's files and every tenant. Uploaded scripts are SQL only: the checks
    refuse meta-commands, and psql runs in restricted mode with a key of the gateway's, so one
    the checks cannot see (a script too large to parse) stops the load."""
    secret = tmp_path / "secret"
    secret.write_text("the-admin-token\n")
    marker = tmp_path / "pwned"
    base = tmp_path / "app.sql"
    base.write_text(SQL_V1)
    _upload(cli, "app1", base)
    before = _state(data_root)
    for name, (path, expect) in _meta_scripts(tmp_path, marker).items():
        for db_id, extra in (("new1", ()), ("app1", ("--yes",))):
            out = cli("db", "upload", db_id, str(path), *extra)
            assert not marker.exists(), (name, out.stderr)
            assert out.returncode != 0, (name, db_id, out.stdout)
            assert expect in out.stderr, (name, out.stderr)
            assert "Traceback" not in out.stderr
            assert _state(data_root) == before, (name, db_id)
    # a plain pg_dump's own \\restrict / \\unrestrict lines (pg_dump 15.14+, 18) still load
    dumped = tmp_path / "restricted.sql"
    dumped.write_text("\\restrict Abc123\n" + SQL_V2 + "\\unrestrict Abc123\n")
    _upload(cli, "new2", dumped)


def test_dry_run_detects_and_changes_nothing(cli, data_root, tmp_path, archives):
    script = tmp_path / "app.sql"
    script.write_text(SQL_V1)
    before = _state(data_root)
    out = cli("--dry-run", "db", "upload", "app1", str(script))
    assert out.returncode == 0, out.stderr
    assert 'would create database "app1"' in out.stdout and "parsed 3 statements" in out.stdout
    assert _state(data_root) == before
    _upload(cli, "app1", script)
    before = _state(data_root)
    out = cli("--json", "db", "upload", "app1", str(archives["nested.tar.gz"]), "--dry-run")
    plan = json.loads(out.stdout)
    assert plan["action"] == "replace" and plan["kind"] == "pgdata" and plan["dry_run"]
    assert plan["current_version"] == _versions(cli, "app1")[0]["version"]
    assert _state(data_root) == before
    bad = tmp_path / "bad.sql"
    bad.write_text("select 1;\nselect (;\n")
    refused = cli("--dry-run", "db", "upload", "app1", str(bad))
    assert refused.returncode != 0 and "bad.sql:2:9:" in refused.stderr


def test_dump_errors_and_busy_database(cli, start_gateway, tls, data_root, tmp_path):
    missing = cli("db", "dump", "nope", str(tmp_path / "x.dump"))
    assert missing.returncode != 0 and 'database "nope" does not exist' in missing.stderr
    assert not (tmp_path / "x.dump").exists()
    script = tmp_path / "a.sql"
    script.write_text(SQL_V2)
    password = _password(_upload(cli, "app1", script).stdout)
    wrong_db = cli("db", "dump", "app1", str(tmp_path / "y.dump"), "--database", "nosuch")
    assert wrong_db.returncode != 0 and 'database "nosuch" does not exist' in wrong_db.stderr
    assert list(tmp_path.iterdir()) == [script]  # no partial file, no temp file

    # a database a running gateway has open is refused before anything is loaded
    gw = start_gateway()
    got = psql(conninfo(gw.port, tls["ca"], "app1", password=password), "select v from other")
    assert got.stdout.strip() == "second"
    before = _state(data_root)
    busy = cli("db", "upload", "app1", str(script), "--yes")
    assert busy.returncode != 0 and "in use by another pgsni process" in busy.stderr
    assert _state(data_root) == before
    gw.stop()


# --- migrate ---------------------------------------------------------------------------------------
def _migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


MIGRATIONS = {
    # numeric order: 1 < 1.1 < 2_1 < 10 (as text, V10 would sort before V2_1)
    "V10__add_total.sql": "alter table orders add column total int not null default 0;\n",
    "V2_1__more_orders.sql": "insert into orders (id) values (2), (3);\n",
    "V1.1__first_order.sql": "insert into orders (id) values (1);\n",
    "V1__create_orders.sql": "create table orders (id int primary key);\n",
    "README.md": "not a migration\n",
    "R__refresh_view.sql": "select 1;\n",  # a repeatable migration: not supported, ignored
}
HISTORY_SQL = ("select string_agg(version || ':' || script || ':' || success::text, ',' "
               "order by installed_rank) from pgsni_schema_history")


def test_migrate_order_history_rerun_and_dry_run(cli, start_gateway, tls, data_root, tmp_path):
    script = tmp_path / "a.sql"
    script.write_text("select 1;\n")
    password = _password(_upload(cli, "app1", script).stdout)
    mig = _migrations(tmp_path / "migrations", MIGRATIONS)

    dry = cli("db", "migrate", "app1", "--dir", str(mig), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = re.findall(r"^\s+(\S+)\tV", dry.stdout, re.MULTILINE)
    assert listed == ["1", "1.1", "2_1", "10"]
    assert "nothing was changed" in dry.stdout
    assert len(_versions(cli, "app1")) == 1  # nothing saved: nothing changed
    assert _query(start_gateway, tls, "app1", password,
                  "select to_regclass('pgsni_schema_history') is null") == "t"

    run = cli("db", "migrate", "app1", "--dir", str(mig))
    assert run.returncode == 0, run.stderr
    assert "now at version 10" in run.stdout and "R__refresh_view.sql: ignored" in run.stderr
    assert len(_versions(cli, "app1")) == 2  # the instance stopped: the change was saved
    assert _query(start_gateway, tls, "app1", password, HISTORY_SQL) == (
        "1:V1__create_orders.sql:true,1.1:V1.1__first_order.sql:true,"
        "2_1:V2_1__more_orders.sql:true,10:V10__add_total.sql:true")
    assert _query(start_gateway, tls, "app1", password, "select count(*), sum(total) from orders") == "3|0"

    again = cli("--json", "db", "migrate", "app1", "--dir", str(mig))
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["pending"] == [] and report["ran"] == []
    assert report["applied_before"] == ["1", "1.1", "2_1", "10"]
    assert len(_versions(cli, "app1")) == 2  # re-running is a no-op


def test_migrate_checksum_failure_and_syntax_errors(cli, start_gateway, tls, data_root, tmp_path):
    script = tmp_path / "a.sql"
    script.write_text("select 1;\n")
    password = _password(_upload(cli, "app1", script).stdout)
    mig = _migrations(tmp_path / "m", {"V1__create.sql": "create table t (x int);\n",
                                       "V2__fill.sql": "insert into t values (1);\n"})
    assert cli("db", "migrate", "app1", "--dir", str(mig)).returncode == 0
    saved = _versions(cli, "app1")

    # a failing migration rolls back as a whole and stops the run; earlier ones stay applied
    _migrations(mig, {"V3__ok.sql": "create table u (y int);\n",
                      "V4__fails.sql": "create table w (z int);\n\ninsert into w\n  select * from nowhere;\n",
                      "V5__never.sql": "create table never (z int);\n"})
    failed = cli("db", "migrate", "app1", "--dir", str(mig))
    assert failed.returncode != 0
    assert f'{mig / "V4__fails.sql"}:4:17: ERROR: relation "nowhere" does not exist' in failed.stderr
    assert "applied V3__ok.sql" in failed.stdout
    state = _query(start_gateway, tls, "app1", password,
                   "select to_regclass('u') is not null, to_regclass('w') is null, "
                   "to_regclass('never') is null, (select max(version) from pgsni_schema_history)")
    assert state == "t|t|t|3"

    # an applied migration that was edited is an error naming the file; nothing runs
    (mig / "V4__fails.sql").unlink()
    (mig / "V2__fill.sql").write_text("insert into t values (2);\n")
    before = _versions(cli, "app1")
    assert len(before) == len(saved) + 1
    edited = cli("db", "migrate", "app1", "--dir", str(mig))
    assert edited.returncode != 0
    assert f"{mig / 'V2__fill.sql'}: checksum differs" in edited.stderr
    assert _versions(cli, "app1") == before
    assert _query(start_gateway, tls, "app1", password, "select to_regclass('never') is null") == "t"

    # a syntax error anywhere is reported with file:line:column before anything runs
    (mig / "V2__fill.sql").write_text("insert into t values (1);\n")
    (mig / "V6__typo.sql").write_text("create table ok (a int);\ncreate tabel nope (a int);\n")
    typo = cli("db", "migrate", "app1", "--dir", str(mig))
    assert typo.returncode != 0
    assert f'{mig / "V6__typo.sql"}:2:8: syntax error at or near "tabel"' in typo.stderr
    assert _versions(cli, "app1") == before
    (mig / "V1_bad_name.sql").write_text("select 1;\n")
    named = cli("db", "migrate", "app1", "--dir", str(mig))
    assert named.returncode != 0 and "two underscores" in named.stderr
