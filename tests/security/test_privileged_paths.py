"""What a tenant controls (its dump, its archive's files, its names and error texts) reaching
something more privileged than the tenant: the client programs the gateway runs as its own OS
user, pg_upgrade's start of the old server, the first start of an imported archive, the
operator's terminal. Each test is an attack that succeeded before its fix."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tarfile
from pathlib import Path

import logging

import psycopg
import pytest

from gateway.compute import dbroles
from gateway.compute.postgres import PostgresProcess
from gateway.logs import TextFormatter
from storage.osuser import RunAs

from ..conftest import reachable_tmpdir
from ..e2e.test_cli import _password, cli  # noqa: F401  (the `cli` fixture)
from ..support.harness import conninfo, wait_until
from ..support.pginstalls import install, installs


def _as_postgres(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True,
                          **RunAs.resolve("postgres").popen_kwargs(), **kw)


def _initdb(bindir: Path, pgdata: Path) -> None:
    _as_postgres(str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions", cwd="/tmp")


@contextlib.contextmanager
def _scratch_postgres(work: Path, bindir: Path):
    """A Postgres of `bindir` outside any gateway (the source of a hostile file): its data in
    work/pgdata, its socket in work/s, run as the postgres OS user; stopped at the end."""
    pgdata, sock = work / "pgdata", RunAs.resolve("postgres").make_dir(work / "s")
    _initdb(bindir, pgdata)
    _as_postgres(str(bindir / "pg_ctl"), "-D", str(pgdata), "-o",
                 f"-c listen_addresses='' -c unix_socket_directories={sock} -c fsync=off",
                 "-l", str(work / "log"), "-w", "start", cwd="/tmp")
    try:
        yield pgdata, sock
    finally:
        _as_postgres(str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop", cwd="/tmp")


@pytest.mark.skipif(not {"15", "18"} <= set(installs().by_major), reason="needs Postgres 15 and 18")
def test_db_upgrade_does_not_obey_the_archives_ssl_passphrase_command(cli, data_root):
    """An imported PGDATA archive (or a database whose tenant was once a superuser: ALTER SYSTEM)
    keeps its postgresql.conf / postgresql.auto.conf. Every start pins SAFE_SETTINGS on the
    command line (ssl=off, ssl_passphrase_command='', ...), so the import is secured and served
    without them taking effect. `db upgrade` runs pg_upgrade, whose start of the old server
    pins only archive_mode and the preload libraries: ssl=on loads the archive's encrypted key
    and runs its ssl_passphrase_command, a shell command, as the Postgres OS user."""
    marker = Path(f"/tmp/pgsni-upgrade-pwned-{data_root.name[-8:]}")
    marker.unlink(missing_ok=True)
    work = RunAs.resolve("postgres").make_dir(reachable_tmpdir("pgsni-sec-"), 0o711)
    pgdata = work / "pgdata"
    _initdb(install("15").bindir, pgdata)
    # an encrypted server key and its certificate, left in the data directory
    _as_postgres("openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(pgdata / "server.key"),
                 "-out", str(pgdata / "server.crt"), "-days", "2", "-subj", "/CN=x",
                 "-passout", "pass:hunter2", cwd="/tmp")
    (pgdata / "server.key").chmod(0o600)
    with open(pgdata / "postgresql.auto.conf", "a") as f:  # what an ALTER SYSTEM left
        f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                f"ssl_passphrase_command = 'sh -c \"id > {marker}; echo hunter2\"'\n")
    archive = work / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(pgdata, arcname=".")

    out = cli("db", "create", "upg", "--from", str(archive), timeout=300)
    assert out.returncode == 0, out.stderr
    assert not marker.exists(), "an ordinary start ran the archive's command"  # pinned: fine
    out = cli("db", "upgrade", "upg", "--to", "18", timeout=300)
    try:
        assert out.returncode == 0, out.stderr  # the upgrade itself goes through
        assert not marker.exists(), (
            f"pg_upgrade ran the archive's ssl_passphrase_command: {marker.read_text()!r} "
            f"(upgrade: rc={out.returncode} {out.stderr[-300:]})")
    finally:
        marker.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(work)])


def test_db_upload_of_a_directory_dump_reads_no_file_of_the_gateways_machine(cli, start_gateway, tls, data_root):
    """A pg_dump directory-format dump lists its large objects in a TOC file of lines
    `<oid> <file name>`; pg_restore opens `<dump dir>/<file name>` with no check, and restores
    what it reads as that large object. pg_restore runs as the gateway's OS user (root in a
    container): a tenant's dump naming `../../..../<gateway's file>` has the gateway copy that
    file into the tenant's database, where the tenant reads it with lo_get. Directory-format
    dumps are refused now (custom and tar formats read everything from inside the archive)."""
    secret = tls["key"]  # the gateway's TLS private key (0600, root's)
    work = RunAs.resolve("postgres").make_dir(reachable_tmpdir("pgsni-sec-"), 0o711)
    try:
        bindir = install().bindir
        with _scratch_postgres(work, bindir) as (_, sock):
            _as_postgres(str(bindir / "psql"), "-h", str(sock), "-U", "postgres", "-X", "-v", "ON_ERROR_STOP=1",
                         "-c", "select lo_from_bytea(4242, 'harmless')", cwd="/tmp")
            _as_postgres(str(bindir / "pg_dump"), "-h", str(sock), "-U", "postgres", "-Fd", "--no-owner",
                         "-f", str(work / "dump"), "postgres", cwd="/tmp")
        dump = work / "dump"
        tocs = list(dump.glob("blobs*.toc"))
        assert tocs, sorted(p.name for p in dump.iterdir())
        up = "../" * 30
        for toc in tocs:  # the hostile edit: the large object's data file is the gateway's key
            toc.write_text(toc.read_text().replace("blob_4242.dat", up + str(secret).lstrip("/")))

        out = cli("db", "upload", "stolen", str(dump), "--password", "tenant-pw-123456", timeout=300)
        if out.returncode == 0:  # what the attack got
            gw = start_gateway()
            with psycopg.connect(conninfo(gw.port, tls["ca"], "stolen", password="tenant-pw-123456"),
                                 autocommit=True) as conn:
                got = conn.execute("select convert_from(lo_get(4242), 'UTF8')").fetchone()[0]
            pytest.fail(f"a directory-format dump was loaded; the tenant reads: {got[:60]!r}...")
        assert "directory-format dump, which pgsni does not load" in out.stderr, out.stderr
        assert not (data_root / "stolen").exists()
    finally:
        subprocess.run(["rm", "-rf", str(work)])


def test_text_log_lines_carry_no_terminal_escapes_from_a_client(start_gateway, tls):
    """The per-connection log line carries the client's startup `user` (before it has
    authenticated: any internet client). In the text format (log_format=text, or auto on a
    terminal) a field is quoted only if it holds whitespace, '"' or '=': an ESC goes to the
    operator's terminal raw (OSC/CSI sequences: retitle, hide lines, fake log lines with
    cursor movement, OSC 52 clipboard writes on some terminals)."""
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "connection closed":
                records.append(record)

    handler, logger = Grab(), logging.getLogger("pgsni.session")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # not `.level =`: that leaves the logger's cached answers stale
    try:
        gw = start_gateway()
        gw.create_db("app1")
        evil = "x\x1b]0;owned\x07\x1b[2K\x1b[1A"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo(gw.port, tls["ca"], "app1", user=evil, password="wrong-password"))
        # the session logs its line once it has ended, a moment after the client saw its error
        wait_until(lambda: records, timeout=15, what="the session's closing log line")
        gw.stop()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [TextFormatter().format(r) for r in records]
    assert any("owned" in line for line in lines), lines
    assert not any("\x1b" in line or "\x07" in line for line in lines), [l for l in lines if "owned" in l]


def test_db_upload_prints_no_terminal_escapes_from_the_dump(cli, data_root):
    """A plain dump's error text (a RAISE in it, an object name) reaches the operator's
    terminal through `Error: running ...: psql:...: ERROR: ...` verbatim."""
    script = data_root.parent / f"escapes-{data_root.name[-8:]}.sql"
    script.write_text("DO $$BEGIN RAISE EXCEPTION E'\\x1b]0;owned\\x07\\x1b[2K\\rall good'; END$$;\n")
    try:
        out = cli("db", "upload", "esc1", str(script))
    finally:
        script.unlink()
    assert out.returncode != 0 and "owned" in out.stderr, out.stderr
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr, repr(out.stderr[-200:])


def test_an_archives_tablespace_map_makes_no_link_out_of_its_data_directory(cli, start_gateway, tls, data_root):
    """Extraction refuses symlinks that leave the archive, but a `tablespace_map` beside a
    `backup_label` (what pg_backup_stop hands out) is plain text: the first start (securing's
    single-user mode, which runs the recovery) creates `pg_tblspc/<oid>` pointing wherever it
    says, as the Postgres OS user. The tablespace then lives outside the database's directory
    (another tenant's, when databases share the Postgres OS user)."""
    target = Path(reachable_tmpdir("pgsni-sec-target-"))
    RunAs.resolve("postgres").chown(target)
    work = RunAs.resolve("postgres").make_dir(reachable_tmpdir("pgsni-sec-"), 0o711)
    try:
        ts = RunAs.resolve("postgres").make_dir(work / "ts")
        bindir = install().bindir
        copy = work / "copy"

        with _scratch_postgres(work, bindir) as (pgdata, sock):
            def sql(*statements: str) -> str:
                args = [a for s in statements for a in ("-c", s)]
                return _as_postgres(str(bindir / "psql"), "-h", str(sock), "-U", "postgres", "-X", "-At",
                                    "-v", "ON_ERROR_STOP=1", *args, cwd="/tmp").stdout.strip()
            sql(f"create tablespace ts location '{ts}'", "grant create on tablespace ts to public")
            oid = sql("select oid from pg_tablespace where spcname = 'ts'")
            # one session: the backup starts and stops in it, the copy is taken in between
            label = _as_postgres(
                "sh", "-c", f"{{ echo \"select pg_backup_start('x', true);\"; sleep 1; "
                f"echo '\\! cp -a {pgdata} {copy}'; "
                # replayed at the first start: the replay makes the tablespace's directories
                "echo \"create table replayed (x text) tablespace ts; insert into replayed select 'x';\"; "
                "echo \"select labelfile from pg_backup_stop(false);\"; "
                f"echo '\\! cp -a {pgdata}/pg_wal/. {copy}/pg_wal/'; }} | "
                f"{bindir / 'psql'} -h {sock} -U postgres -X -At -v ON_ERROR_STOP=1", cwd="/tmp").stdout
        label = label[label.index("START WAL LOCATION"):]
        (copy / "postmaster.pid").unlink(missing_ok=True)
        (copy / "pg_tblspc" / oid).unlink()  # an absolute link: extraction would refuse it
        (copy / "backup_label").write_text(label if label.endswith("\n") else label + "\n")
        (copy / "tablespace_map").write_text(f"{oid} {target}\n")
        archive = work / "hostile.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(copy, arcname=".")
        out = cli("db", "create", "ts1", "--from", str(archive), timeout=300)
        link = data_root / "ts1" / "pgdata" / "pg_tblspc" / oid
        where = os.readlink(link) if link.is_symlink() else None
        if where is not None and not Path(where).resolve().is_relative_to(data_root / "ts1"):
            gw = start_gateway()
            with psycopg.connect(conninfo(gw.port, tls["ca"], "ts1", password=_password(out.stdout)),
                                 autocommit=True) as conn:  # the tenant, not a superuser
                conn.execute("create table outside (x text) tablespace ts")
                conn.execute("insert into outside select repeat('x', 1000) from generate_series(1, 1000)")
                conn.execute("checkpoint")
            gw.stop()
            written = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
            pytest.fail(f"the imported database has a tablespace at {where}, outside its directory; "
                        f"the tenant wrote there: {written}")
        assert out.returncode != 0 and "archive holds a tablespace_map" in out.stderr, out.stderr
        assert list(target.iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(work), str(target)])


@pytest.mark.skipif("18" not in installs().by_major, reason="extension_control_path is Postgres 18's")
async def test_no_start_of_an_instance_reads_extension_control_files_where_its_files_say(template_pgdata):
    """`extension_control_path` names the directories CREATE EXTENSION reads control files
    from (whose scripts then run as the bootstrap superuser). A client-serving start pins it
    to the gateway's own; every other start (securing's maintenance server, a point-in-time
    restore's recovery, an upgrade's check) must not take it from an archive's ALTER SYSTEM."""
    work = reachable_tmpdir("pgsni-ecp-")
    try:
        run_as = RunAs.resolve("postgres")
        pgdata = work / "pgdata"
        subprocess.run(["cp", "-a", str(template_pgdata), str(pgdata)], check=True)  # owner kept
        if (pgdata / "PG_VERSION").read_text().strip() != "18":
            pytest.skip("the template is not Postgres 18")
        _as_postgres("sh", "-c", f"echo \"extension_control_path = '/tmp/evil:\\$system'\" >> "
                                 f"{pgdata}/postgresql.auto.conf")
        process = PostgresProcess(install("18").bindir, pgdata, run_as.make_dir(work / "s"),
                                  work / "log", run_as, {}, maintenance=False)
        await process.start(60)
        try:
            async with await dbroles.connect(process.socket_dir) as conn:
                shown = await (await conn.execute("show extension_control_path")).fetchone()
        finally:
            await process.stop(60)
        assert shown == ("$system",)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
