"""`db upload`: create or replace a database from a file, whose kind is told from its content —
a PGDATA archive (tar, tar.gz, tar.zst), a pg_dump archive (custom or tar format, restored
with pg_restore; not directory format, whose files pg_restore opens by any path they name) or
a plain SQL script (checked with the SQL parser, run with psql).

The new data directory is built off to the side (a hidden work directory under the data root,
with its own Postgres on its own socket), stored as a new version whose parent is the current
one, and only then swapped in: a failure leaves no new database and an existing one untouched,
and a replaced state stays in storage as an older version (`db restore` brings it back)."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import psycopg
import zstandard

from gateway.compute import dbroles, extensions, securing
from gateway.compute.instances import InstanceManager
from gateway.compute.lifecycle import Held
from gateway.compute.pgbins import PgInstall, pgdata_major
from gateway.compute.postgres import PostgresError, PostgresProcess
from gateway.wire.scram import scram_verifier
from storage import roles as roles_mod
from storage.atomic import remove_tree
from storage.local import LocalCatalog, copy_tree
from storage.sources import open_source

from . import pgtools, sqlfiles
from .importing import import_archive

HEAD = 64 << 10  # bytes read to tell the kind of a file
PARSE_LIMIT = 64 << 20  # larger SQL scripts are not parse-checked first (psql still stops at an error)
_ZSTD, _GZIP = b"\x28\xb5\x2f\xfd", b"\x1f\x8b"
KINDS = ("pgdata", "custom", "tar-dump", "plain")
RESTORE_FLAGS = ["--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction"]


ROLES_HINT = ("hint: a dump holds no roles, and the new database has only role postgres; dump "
              "with --no-owner --no-privileges (pg_dump or pgsni db dump), or upload a "
              "custom-format dump (restored without owners and privileges)")


class UploadError(Exception):
    pass


@dataclass(frozen=True)
class Detected:
    kind: str  # one of KINDS
    label: str  # for people: "a PGDATA archive (tar.zst)"


@dataclass
class Plan:
    id: str
    file: str
    kind: str
    label: str
    size: int
    replace: bool
    current_version: str | None  # the stored version a replace keeps as an older one
    checked: str  # what was verified before anything changes
    major: str | None = None  # Postgres major of the result (None: a PGDATA archive's own)


@dataclass
class Uploaded:
    plan: Plan
    version: str  # the new current version
    password: str | None  # role postgres' new password (None: the old one was kept)


# --- telling the kind ---------------------------------------------------------------------------
def detect(path: Path) -> Detected:
    if path.is_dir():
        if (path / "toc.dat").is_file():
            # its table of contents names the files pg_restore opens, by any path (`../../..`),
            # and pg_restore runs as the gateway's OS user: a hostile one would load the
            # gateway's own files into the tenant's database
            raise UploadError(f"{path} is a pg_dump directory-format dump, which pgsni does not load "
                              f"(its table of contents could name any file on this machine): make a "
                              f"custom-format dump (pg_dump -Fc) or a plain script "
                              f"(pg_restore -f dump.sql {path.name}) and upload that")
        raise UploadError(f"{path} is a directory, not a file pgsni can load")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD)
    except OSError as e:
        raise UploadError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise UploadError(f"{path} is empty")
    if head.startswith(b"PGDMP"):
        return Detected("custom", "a pg_dump custom-format dump")
    compression = "zstd" if head.startswith(_ZSTD) else "gzip" if head.startswith(_GZIP) else None
    inner = _decompress_head(head, compression) if compression else head
    member = _tar_member(inner)
    if member is not None:
        if member in ("toc.dat", "./toc.dat") and compression is None:
            return Detected("tar-dump", "a pg_dump tar-format dump")
        suffix = {None: "tar", "gzip": "tar.gz", "zstd": "tar.zst"}[compression]
        return Detected("pgdata", f"a PGDATA archive ({suffix})")
    if compression:
        what = "SQL text" if _is_text(inner) else "data that is not a tar archive"
        raise UploadError(f"{path} holds {compression}-compressed {what}; decompress it first "
                          f"({'gunzip' if compression == 'gzip' else 'unzstd'} -k {path.name})")
    if _is_text(head):
        return Detected("plain", "a plain SQL dump")
    raise UploadError(f"{path} is not something pgsni can load: expected a PGDATA archive (tar, "
                      f"tar.gz, tar.zst), a pg_dump custom-format dump or a plain SQL dump; it "
                      f"starts with bytes {head[:8].hex(' ')}")


def _decompress_head(head: bytes, compression: str) -> bytes:
    try:
        if compression == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4096)
        return zstandard.ZstdDecompressor().decompressobj().decompress(head)[:4096]
    except (zlib.error, zstandard.ZstdError):
        return b""


def _tar_member(data: bytes) -> str | None:
    """The first member's name if `data` starts with a valid tar header (its checksum holds)."""
    if len(data) < tarfile.BLOCKSIZE:
        return None
    try:
        return tarfile.TarInfo.frombuf(data[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape").name
    except tarfile.HeaderError:
        return None


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(data) - 3  # only a character cut at the end of the sample
    return True


# --- checking before anything changes -------------------------------------------------------------
async def check(path: Path, found: Detected, bindir: Path) -> str:
    """Verify what can be verified without loading: pg_restore reads a dump's table of
    contents; a plain script is parsed (psql meta-commands and COPY data aside)."""
    if found.kind in ("custom", "tar-dump"):
        proc = await pgtools.run_tool(bindir, "pg_restore", ["--list", str(path)],
                                      what=f"reading {path} as {found.label}")
        entries = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith(";")]
        return f"pg_restore read its table of contents ({len(entries)} entries)"
    if found.kind == "plain":
        meta = await asyncio.to_thread(sqlfiles.psql_meta_command, path)
        if meta is not None:
            raise meta
        size = path.stat().st_size
        if size > PARSE_LIMIT:
            return f"not parse-checked ({size >> 20} MB); psql stops at the first error"
        text = await asyncio.to_thread(sqlfiles.read_sql, path)
        stmts = await asyncio.to_thread(sqlfiles.parse_sql_text, sqlfiles.without_psql_parts(text), path)
        return f"parsed {len(stmts)} statements"
    return "the archive is checked while it is extracted"


async def plan(manager: InstanceManager, db_id: str, path: Path) -> Plan:
    databases, installs = manager.databases, manager.installs
    found = detect(path)
    if databases.catalog.db_dir(db_id).exists():
        databases.catalog.lock(db_id).acquire().release()  # DatabaseBusy now, not after loading
    checked = await check(path, found, installs.default.bindir)
    cur = await databases.current(db_id, fresh=True)
    replace = databases.catalog.exists(db_id) or cur is not None
    size = path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.iterdir() if p.is_file())
    # a dump loaded over a database keeps its major (db upgrade changes it); a new one gets the default
    major = None if found.kind == "pgdata" else (
        pgdata_major(databases.catalog.pgdata(db_id)) if databases.catalog.exists(db_id) else
        cur.manifest.pg_major if cur else installs.default_major)
    return Plan(db_id, str(path), found.kind, found.label, size, replace,
                cur.manifest.version if cur else None, checked, major)


async def _run_script(bindir: Path, sock: Path, file: str) -> None:
    """Run a plain script with psql as the tenant role. psql is a client on the gateway's
    machine, run as the gateway's OS user, and its meta-commands act there (`\\!` runs a shell,
    `\\copy` reads files, `\\connect` reaches other sockets): `check` refuses scripts with
    meta-command lines, and psql runs in restricted mode under a key of the gateway's, so no
    meta-command it finds anywhere runs. The script is streamed in (psql would refuse a plain
    pg_dump's own `\\restrict` line: blanked)."""
    key = secrets.token_hex(16)
    try:
        await pgtools.run_tool(bindir, "psql", [*dbroles.tool_args(sock, act_as=dbroles.TENANT), "-X",
                               "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                               "-c", f"\\restrict {key}", "-f", "-"],
                               what=f"running {file}", stdin=sqlfiles.restricted_script(file))
    except pgtools.ToolError as e:
        message = str(e).replace("psql:<stdin>:", f"psql:{file}:")
        if re.search(r'ERROR: +role ".*" does not exist', message):
            raise UploadError(f"{message}\n{ROLES_HINT}") from None
        if "invalid command \\restrict" in message:
            raise UploadError(f"{message}\nthis psql ({bindir}) has no restricted mode, without which "
                              f"uploaded scripts are not run: PostgreSQL 15.14, 16.10, 17.6, 18 or "
                              f"later is needed") from None
        if "backslash commands are restricted" in message:
            raise UploadError(f"{message}\nan uploaded script must be SQL only: psql meta-commands "
                              f"would run on the gateway's machine") from None
        raise UploadError(message) from None


# --- building the new data directory off to the side --------------------------------------------
class _Build:
    """`<data_root>/.upload-<hex>/new/` (pgdata/, roles.json, postgres.log): invisible to the
    gateway (not a database id) until it is renamed into place."""

    def __init__(self, manager: InstanceManager) -> None:
        self.manager, self.settings = manager, manager.settings
        catalog = manager.catalog
        self.token = secrets.token_hex(4)
        self.side = LocalCatalog(catalog.root / f".upload-{self.token}", catalog.run_as)
        self.dir = self.side.db_dir("new")
        self.process: PostgresProcess | None = None
        self.install: PgInstall | None = None  # the binaries of the data directory being built

    async def make_pgdata(self, plan: Plan) -> None:
        self.side.prepare()
        if plan.kind == "pgdata":
            async with open_source(plan.file, self.settings) as source:
                await import_archive(self.side, "new", source, majors=self.manager.installs.by_major,
                                     max_bytes=self.settings.max_restore_mb << 20,
                                     max_files=self.settings.max_restore_files)
        else:
            template = await asyncio.to_thread(self.manager.catalog.template, plan.major)
            with self.side.staging("new") as pgdata:
                await asyncio.to_thread(copy_tree, template, pgdata)

    async def start(self, plan: Plan) -> None:
        s, catalog, uids = self.settings, self.manager.catalog, self.manager.uids
        self.manager.make_socket_root()
        self.install = self.manager.installs.for_pgdata(self.dir / "pgdata")
        if plan.kind == "pgdata":  # an archive from elsewhere: its roles are not ours yet
            try:
                await securing.secure(self.install.bindir, self.dir / "pgdata", catalog.run_as,
                                      s.socket_path / f"us-{self.token}", self.dir / "postgres.log",
                                      options=s.postgres_options, timeout=s.start_timeout)
            except securing.SecureError as e:
                raise UploadError(f"the archive cannot be served safely: {e}") from None
        # the dump's SQL runs as the tenant role; with instance uids, under a uid of its own too
        run_as = catalog.run_as if uids is None else await asyncio.to_thread(
            uids.claim, f".upload-{self.token}", self.dir, self.dir / "pgdata")
        options = {**extensions.instance_options(self.install, catalog.root, s.trusted_extensions),
                   **s.postgres_options}
        self.process = PostgresProcess(self.install.bindir, self.dir / "pgdata", s.socket_path / f"up-{self.token}",
                                       self.dir / "postgres.log", run_as, options)
        await self.process.start(s.start_timeout)

    async def load(self, plan: Plan) -> None:
        assert self.process is not None
        sock, bindir = self.process.socket_dir, self.install.bindir
        if plan.kind in ("custom", "tar-dump"):
            await pgtools.run_tool(bindir, "pg_restore", [*dbroles.tool_args(sock, act_as=dbroles.TENANT),
                                   *RESTORE_FLAGS, plan.file], what=f"restoring {plan.file}")
        elif plan.kind == "plain":
            await _run_script(bindir, sock, plan.file)

    async def take_over(self, verifier: str) -> dict[str, roles_mod.Role]:
        """Give role postgres `verifier` and save the roles beside the data directory."""
        assert self.process is not None
        try:
            async with await dbroles.connect(self.process.socket_dir) as conn:
                await conn.execute(psycopg.sql.SQL("ALTER ROLE postgres PASSWORD {}").format(verifier))
                roles = await dbroles.read_roles(conn)
        except psycopg.Error as e:
            raise UploadError(f"cannot set up role \"postgres\" in the uploaded data: {_first_line(e)}") from None
        await asyncio.to_thread(roles_mod.save, self.dir / "roles.json", roles)
        return roles

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop(self.settings.stop_timeout)
            shutil.rmtree(self.process.socket_dir, ignore_errors=True)
            self.process = None
            if self.manager.uids is not None:  # renamed into place, the database keeps the uid
                self.manager.uids.release(f".upload-{self.token}")

    async def discard(self) -> None:
        await self.stop()
        await remove_tree(self.side.root)


# --- the whole upload -----------------------------------------------------------------------------
async def upload(manager: InstanceManager, p: Plan, password: str | None = None) -> Uploaded:
    """Carry out `p` (from `plan`). `password`: role postgres' new password; None keeps the
    replaced database's (a new database gets a generated one)."""

    databases = manager.databases
    verifier = None
    if p.replace and password is None:
        old = (await databases.roles(p.id) or {}).get("postgres")
        verifier = old.verifier if old else None
    if verifier is None:
        password = password or secrets.token_urlsafe(18)
        verifier = scram_verifier(password)
    build = _Build(manager)
    try:
        await build.make_pgdata(p)
        await build.start(p)
        roles = await build.take_over(verifier)
        await build.load(p)
        roles = await build.take_over(verifier)  # a script may have changed roles or postgres' password
        await build.stop()
        version = await _commit(manager, p, build.dir, roles)
    except BaseException as e:
        await build.discard()
        if isinstance(e, (PostgresError, pgtools.ToolError, sqlfiles.SqlFileError, OSError)):
            raise UploadError(str(e)) from None
        raise
    await remove_tree(build.side.root)
    return Uploaded(p, version, password)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


async def _commit(manager: InstanceManager, p: Plan, built: Path, roles) -> str:
    """Store the built copy as the new current version of `p.id`, then put it in place locally."""
    async with manager.stopped(p.id, "replaced by db upload") as held:
        return await store_and_swap(held, built, roles, replace=p.replace,
                                    note=f"pgsni db upload ({p.kind})", before="saved before db upload")


async def store_and_swap(held: Held, built: Path, roles, *, replace: bool, note: str, before: str) -> str:
    """With the database held stopped (`manager.stopped`): save what its local copy holds
    (`before` is that version's note), store `built` (a database directory beside the data
    root) as the new current version, and rename it into place. The version it replaces stays
    in storage. Returns the new version."""
    db_id, databases = held.db.id, held.db.databases
    catalog = databases.catalog
    lock = catalog.lock(db_id).acquire() if catalog.db_dir(db_id).exists() else None
    try:
        if catalog.exists(db_id):
            await held.save_now(note=before)
        cur = await databases.current(db_id, fresh=True)
        if replace != (cur is not None or catalog.exists(db_id)):
            raise UploadError(f'database "{db_id}" was {"deleted" if replace else "created"} '
                              "meanwhile; nothing was changed")
        return await held.replace(built, roles, expect=cur, note=note)
    finally:
        if lock is not None:
            lock.release()
