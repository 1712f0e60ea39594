"""`pgsni db create ID --from SOURCE`: real PGDATA archives (one taken from a running server)
as .tar, .tar.gz (nested) and .tar.zst, read from a file, the moto S3 server and a local
http/https server, then served through a real gateway; and every refusal leaving nothing
behind (no database, no stored version, no work directory)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import pty
import shutil
import ssl
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from gateway.compute import dbroles
from storage.osuser import RunAs

from ..conftest import reachable_tmpdir
from ..support.harness import conninfo, postmasters, psql
from ..support.moto import ACCESS_KEY, SECRET_KEY
from ..support.pginstalls import install, installs
from .test_cli import _password, cli  # noqa: F401  (the `cli` fixture)

ROWS = "select count(*), sum(x) from t"
ROWS_OK = "500|125250"
APP_PW = "app-secret-pw"
MAJOR = installs().default_major  # "18" where installed, else the newest
OLDER = next(str(m) for m in range(int(MAJOR) - 1, 9, -1) if str(m) not in installs().by_major)


# --- building archives ------------------------------------------------------------------------
def _as_postgres(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True,
                          **RunAs.resolve("postgres").popen_kwargs(), **kw)


class _Server:
    """A Postgres on a PGDATA, run with pg_ctl as the postgres OS user while in the block."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata, self.bindir = pgdata, install().bindir

    def __enter__(self) -> "_Server":
        self.sock = RunAs.resolve("postgres").make_dir(reachable_tmpdir("pgsni-src-s-"))
        opts = f"-c listen_addresses='' -c unix_socket_directories={self.sock} -c fsync=off"
        try:
            _as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-o", opts,
                         "-l", str(self.pgdata.parent / "log"), "-w", "start")
        except BaseException:
            shutil.rmtree(self.sock, ignore_errors=True)
            raise
        return self

    def sql(self, statement: str, user: str = "postgres") -> str:
        return _as_postgres("psql", "-h", str(self.sock), "-U", user, "-d", "postgres", "-X",
                            "-At", "-v", "ON_ERROR_STOP=1", "-c", statement).stdout.strip()

    def __exit__(self, *exc) -> None:
        try:
            _as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast",
                         "-w", "stop")
        finally:
            shutil.rmtree(self.sock, ignore_errors=True)


def _tar(pgdata: Path, out, mode: str, arcname: str = ".") -> None:
    kw = {"compresslevel": 1} if mode == "w:gz" else {}
    with tarfile.open(fileobj=out, mode=mode, **kw) as tar:
        tar.add(pgdata, arcname=arcname)


def _tar_zst(pgdata: Path, path: Path) -> None:
    with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z:
        _tar(pgdata, z, "w|")


def _small_tar(path: Path, members: dict[str, bytes | str]) -> Path:
    """A tar of files (bytes) and symlinks (str: the target)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def archives(template_pgdata):
    """Archives of one PGDATA with table t (500 rows) and role app (password APP_PW)."""
    work = RunAs.resolve("postgres").make_dir(reachable_tmpdir("pgsni-src-"), 0o711)
    try:
        yield _build_archives(template_pgdata, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_archives(template_pgdata: Path, work: Path) -> dict[str, Path]:
    # a data directory as any other system makes it: bootstrap superuser "postgres", trust
    pgdata = work / "pgdata"
    _as_postgres(str(install().bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions")
    with _Server(pgdata) as server:
        server.sql("create table t(x int); insert into t select generate_series(1, 500); "
                   f"create role app login password '{APP_PW}'; grant select on t to app")
        server.sql("checkpoint")
        # taken while the server runs: postmaster.pid is in it, Postgres must recover
        _tar_zst(pgdata, work / "running.tar.zst")
    # a foreign configuration that must not take effect here
    with open(pgdata / "postgresql.auto.conf", "a") as f:
        f.write("hba_file = '/nonexistent/pg_hba.conf'\ndata_directory = '/nonexistent'\n")
    with open(work / "stopped.tar", "wb") as f:
        _tar(pgdata, f, "w")
    with open(work / "nested.tar.gz", "wb") as f:
        _tar(pgdata, f, "w:gz", arcname="data")
    paths = {p.name: p for p in work.iterdir() if p.is_file()}
    paths["no-postgres-role.tar"] = _no_postgres_role(work)
    paths["untrusted.tar"] = _untrusted_routine(work)
    return paths


def _untrusted_routine(work: Path) -> Path:
    """A data directory whose superuser left a routine in an untrusted language behind: a tenant that is
    not a superuser must not get to call code like that."""
    pgdata = work / "untrusted-pgdata"
    _as_postgres(str(install().bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust",
                 "--no-instructions", cwd="/tmp")
    with _Server(pgdata) as server:
        server.sql("create function evil(int) returns int language internal as 'int4abs'")
    with open(work / "untrusted.tar", "wb") as f:
        _tar(pgdata, f, "w")
    return work / "untrusted.tar"


def _no_postgres_role(work: Path) -> Path:
    """A data directory whose superuser is `admin`: there is no role postgres."""
    pgdata = work / "admin-pgdata"
    _as_postgres(str(install().bindir / "initdb"), "-D", str(pgdata), "-U", "admin", "-A", "trust",
                 "--no-instructions", cwd="/tmp")
    with open(work / "no-postgres-role.tar", "wb") as f:
        _tar(pgdata, f, "w")
    return work / "no-postgres-role.tar"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- serving archives over http(s) -----------------------------------------------------------
@pytest.fixture(scope="module")
def web(archives):
    """http:// and https:// servers on 127.0.0.1 serving the archives' directory."""
    import trustme

    directory = next(iter(archives.values())).parent
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    ca_file = directory / "web-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    servers = {}
    for scheme in ("http", "https"):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if scheme == "https":
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[scheme] = server
    yield {s: f"{s}://127.0.0.1:{srv.server_address[1]}" for s, srv in servers.items()} | {"ca": ca_file}
    for server in servers.values():
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# --- helpers -----------------------------------------------------------------------------------
def _snapshot(cli, data_root: Path) -> tuple[str, set[str]]:
    listed = cli("db", "list")
    assert listed.returncode == 0, listed.stderr
    # the gateway's name (.gateway-id), its lease marks (.leases, empty once given up) and its
    # lease heartbeat in storage may appear, and a free lease (leases are given up by writing
    # them free, docs/storage.md: it holds nothing); a database's own objects must not
    stored = data_root / "_storage" / "dbs"
    marks = data_root / ".leases"
    assert not marks.exists() or not any(marks.iterdir()), "a lease mark was left behind"
    return listed.stdout, ({p.name for p in data_root.iterdir()} - {".gateway-id", "_storage", ".leases"}
                           | {f"stored:{p.relative_to(stored)}" for p in stored.rglob("*")
                              if p.is_file() and not _free_lease(p)})


def _free_lease(path: Path) -> bool:
    if path.name == ".lease.json.etag":
        return _free_lease(path.with_name("lease.json"))
    return path.name == "lease.json" and json.loads(path.read_bytes()).get("holder") is None


def _refused(cli, data_root: Path, *args: str, expect: str, extra_env=None) -> str:
    """Run `pgsni db create ...` expecting a one-line refusal mentioning `expect`, and check
    that it left nothing behind."""
    before = _snapshot(cli, data_root)
    out = cli("db", "create", *args, extra_env=extra_env)
    assert out.returncode != 0, out.stdout
    assert expect in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("Error:")] != [], out.stderr
    assert _snapshot(cli, data_root) == before
    assert not [p for p in data_root.iterdir() if p.name.startswith((".new-", ".restore-", ".trash-"))]
    return out.stderr


def _created(cli, db_id: str, source: str, *extra: str, extra_env=None) -> tuple[str, str]:
    out = cli("db", "create", db_id, "--from", source, *extra, extra_env=extra_env)
    assert out.returncode == 0, out.stderr
    assert f'created database "{db_id}"' in out.stdout
    return _password(out.stdout), out.stderr


def _assert_serves_rows(start_gateway, tls, db_id: str, password: str) -> None:
    gw = start_gateway()
    try:
        got = psql(conninfo(gw.port, tls["ca"], db_id, password=password), ROWS)
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == ROWS_OK
        app = psql(conninfo(gw.port, tls["ca"], db_id, user="app", password=APP_PW), ROWS)
        assert app.returncode == 0, app.stderr  # the archive's own roles keep their passwords
        assert app.stdout.strip() == ROWS_OK
    finally:
        gw.stop()


# --- creating ------------------------------------------------------------------------------------
def test_from_local_tar_zst_of_a_running_server(cli, start_gateway, tls, data_root, archives):
    password, stderr = _created(cli, "imp1", str(archives["running.tar.zst"]))
    assert "━" not in stderr  # no progress bar when stderr is not a terminal
    pgdata = data_root / "imp1" / "pgdata"
    assert postmasters(pgdata) == []
    assert not (pgdata / "postmaster.pid").exists()
    assert (pgdata / "pg_hba.conf").read_text() == dbroles.hba()  # the gateway's, not the archive's
    postgres_uid = RunAs.resolve("postgres").uid
    for path in [pgdata, *pgdata.rglob("*")]:
        st = path.lstat()
        assert st.st_uid == postgres_uid, path
        assert st.st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    listed = cli("db", "list")
    assert listed.stdout.split() == ["imp1", "local+stored"]  # stopping saved the first version
    versions = cli("db", "versions", "imp1")
    assert versions.returncode == 0 and len(versions.stdout.splitlines()) == 1
    _assert_serves_rows(start_gateway, tls, "imp1", password)


def test_from_nested_tar_gz_with_right_sha256(cli, start_gateway, tls, data_root, archives):
    source = archives["nested.tar.gz"]
    password, _ = _created(cli, "imp2", str(source), "--sha256", _sha256(source).upper(),
                           "--password", "chosen-pw")
    assert password == "chosen-pw"
    assert sorted(p.name for p in (data_root / "imp2").iterdir() if p.is_dir()) == ["pgdata"]
    _assert_serves_rows(start_gateway, tls, "imp2", password)


def test_from_s3(cli, start_gateway, tls, data_root, archives, moto_server):
    bucket = moto_server.create_bucket()
    moto_server.client().upload_file(str(archives["stopped.tar"]), bucket, "dumps/db.tar")
    env = {"PGSNI_S3_ENDPOINT": moto_server.endpoint_url, "PGSNI_S3_ACCESS_KEY": ACCESS_KEY,
           "PGSNI_S3_SECRET_KEY": SECRET_KEY, "PGSNI_S3_REGION": "us-east-1",
           "PGSNI_STORAGE_ATTEMPTS": "1"}
    password, _ = _created(cli, "imp3", f"s3://{bucket}/dumps/db.tar", extra_env=env)
    _assert_serves_rows(start_gateway, tls, "imp3", password)
    _refused(cli, data_root, "imp4", "--from", f"s3://{bucket}/dumps/missing.tar",
             expect=f"s3://{bucket}/dumps/missing.tar: no such object", extra_env=env)
    _refused(cli, data_root, "imp4", "--from", f"s3://{bucket}", expect="is not s3://bucket/key",
             extra_env=env)


def test_from_http_warns_and_https_needs_a_trusted_ca(cli, start_gateway, tls, data_root,
                                                      archives, web):
    password, stderr = _created(cli, "imp5", f"{web['http']}/stopped.tar")
    assert "warning:" in stderr and "unencrypted" in stderr
    _assert_serves_rows(start_gateway, tls, "imp5", password)

    url = f"{web['https']}/running.tar.zst"
    _refused(cli, data_root, "imp6", "--from", url, expect="certificate verify failed")
    password, stderr = _created(cli, "imp6", url, extra_env={"SSL_CERT_FILE": str(web["ca"])})
    assert "warning" not in stderr
    _assert_serves_rows(start_gateway, tls, "imp6", password)

    _refused(cli, data_root, "imp7", "--from", f"{web['https']}/missing.tar.zst",
             expect="HTTP 404", extra_env={"SSL_CERT_FILE": str(web["ca"])})


# --- refusing ------------------------------------------------------------------------------------
def test_wrong_sha256_leaves_nothing(cli, data_root, archives):
    stderr = _refused(cli, data_root, "bad1", "--from", str(archives["stopped.tar"]),
                      "--sha256", "0" * 64, expect="has sha256 " + _sha256(archives["stopped.tar"]))
    assert "not the expected " + "0" * 64 in stderr
    malformed = cli("db", "create", "bad1", "--from", str(archives["stopped.tar"]), "--sha256", "xyz")
    assert malformed.returncode != 0 and "64 hexadecimal digits" in malformed.stderr


def test_hostile_archive_leaves_nothing(cli, data_root, tmp_path):
    escape = data_root.parent / f"escaped-{data_root.name}"
    hostile = _small_tar(tmp_path / "hostile.tar", {"PG_VERSION": MAJOR.encode(),
                                                    f"../{escape.name}": b"gotcha"})
    _refused(cli, data_root, "bad2", "--from", str(hostile), expect="has a '..' component")
    assert not escape.exists()


@pytest.mark.parametrize("case, expect", [
    ("no-pg-version", "archive does not contain a Postgres data directory (no PG_VERSION)"),
    ("old-major", f"archive is Postgres {OLDER}; this gateway runs {installs().listing}"),
    ("not-an-archive", "archive is corrupt or truncated"),
    ("truncated", "archive is corrupt or truncated"),
    ("link-out", "archive symlink pg_wal -> ../wal points outside the directory"),
])
def test_not_a_usable_pgdata(cli, data_root, tmp_path, archives, case, expect):
    if case == "no-pg-version":
        source = _small_tar(tmp_path / "x.tar", {"data/base/1/123": b"x", "data/README": b"hi"})
    elif case == "old-major":
        source = _small_tar(tmp_path / "x.tar", {"pgdata/PG_VERSION": f"{OLDER}\n".encode()})
    elif case == "link-out":  # inside the archive, but not inside the data directory
        source = _small_tar(tmp_path / "x.tar", {"d/PG_VERSION": MAJOR.encode(), "wal/0001": b"w",
                                                 "d/pg_wal": "../wal"})
    elif case == "not-an-archive":
        source = tmp_path / "x.tar"
        source.write_text("this is not a tar file\n" * 100)
    else:
        source = tmp_path / "x.tar.zst"
        source.write_bytes(archives["running.tar.zst"].read_bytes()[:200_000])
    _refused(cli, data_root, "bad3", "--from", str(source), expect=expect)


def test_archive_whose_superuser_is_not_postgres(cli, start_gateway, tls, data_root, archives):
    """Its bootstrap superuser becomes the gateway's pgsni_admin and a tenant role postgres
    (no superuser) is made for it: the archive is served, not refused."""
    password, _ = _created(cli, "adm1", str(archives["no-postgres-role.tar"]))
    gw = start_gateway()
    try:
        out = psql(conninfo(gw.port, tls["ca"], "adm1", password=password),
                   "select rolname, rolsuper from pg_roles where oid = 10 or rolname = current_user "
                   "order by oid")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["pgsni_admin|t", "postgres|f"]
    finally:
        gw.stop()


def test_archive_with_an_untrusted_routine_is_refused(cli, data_root, archives):
    _refused(cli, data_root, "bad6", "--from", str(archives["untrusted.tar"]),
             expect="routine public.evil(integer) in language internal")


def test_bad_sources(cli, data_root, tmp_path, web):
    _refused(cli, data_root, "bad5", "--from", str(tmp_path / "nope.tar.zst"),
             expect=f"{tmp_path / 'nope.tar.zst'}: no such file")
    _refused(cli, data_root, "bad5", "--from", str(tmp_path), expect="is not a regular file")
    _refused(cli, data_root, "bad5", "--from", "ftp://example.com/x.tar",
             expect="unsupported source 'ftp://example.com/x.tar'")
    _refused(cli, data_root, "bad5", "--from", f"{web['http']}/nope.tar", expect="HTTP 404")


def test_existing_id_is_refused_before_reading(cli, data_root, archives):
    assert cli("db", "create", "dup").returncode == 0
    _refused(cli, data_root, "dup", "--from", "/nonexistent.tar", expect='database "dup" already exists')


def test_progress_bar_on_a_terminal(cli, data_root, archives, monkeypatch):
    """With stderr on a pseudo-terminal, a rich progress bar shows bytes out of the total."""
    master, slave = pty.openpty()
    real_run = subprocess.run

    def run_on_pty(argv, **kw):  # what `cli` runs, with stderr on the terminal
        kw.pop("capture_output")
        return real_run(argv, stdout=subprocess.PIPE, stderr=slave, **kw)

    monkeypatch.setattr(subprocess, "run", run_on_pty)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out = cli("db", "create", "tty1", "--from", str(archives["nested.tar.gz"]),
              extra_env={"COLUMNS": "120", "TERM": "xterm"})
    monkeypatch.undo()
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert out.returncode == 0, text
    size_mb = archives["nested.tar.gz"].stat().st_size / 1e6
    assert "reading archive" in text and "━" in text
    assert f"{size_mb:.1f}" in text or f"{size_mb:.0f}" in text, text

