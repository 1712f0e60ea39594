"""The steps behind `gateway/ops/operations.py` that talk to Postgres or the disk: init files and
the owner role of a new database, passwords, verification, sizes and connection counts."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import time
from typing import Sequence

import psycopg
from psycopg import sql

from gateway.compute import dbroles
from gateway.compute.instances import Instance, InstanceManager
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.wire.scram import scram_verifier
from storage import errors as storage_errors
from storage.atomic import remove_tree
from storage.local import DatabaseBusy, LocalCatalog

from .results import OperationError, Verified
from .sqlfiles import SqlFile, SqlFileError, parse_files, run_files_async

ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def new_password() -> str:
    return secrets.token_urlsafe(18)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def iso_now() -> str:
    return iso(time.time())


def check_owner(owner: str | None) -> None:
    if owner is None:
        return
    if not ROLE_NAME.fullmatch(owner) or owner.startswith("pg_"):
        raise OperationError("invalid", f"{owner!r} is not a usable role name: lowercase letters, "
                             "digits and _, not starting with a digit or pg_")
    if owner == dbroles.TENANT or owner in dbroles.RESERVED:
        raise OperationError("invalid", f'the owner role must not be "{owner}" (pgsni makes that role itself)')


def parse_init_files(paths: Sequence[str]) -> list[SqlFile]:
    """Parse every file (pglast) before anything is created: a syntax error is `invalid`,
    reported as file:line:column."""
    try:
        return parse_files(paths)
    except SqlFileError as e:
        raise OperationError("invalid", str(e)) from None


async def initialise(inst: Instance, owner: str | None, owner_password: str | None,
                     files: Sequence[SqlFile]) -> int:
    """In a new database: create the owner role (LOGIN, owner of database postgres and schema
    public, managed by the tenant role), then run the init files in order, as the owner when
    there is one, else as the tenant role (never as a superuser: gateway/compute/dbroles.py). Returns
    the number of statements run."""
    if owner is None and not files:
        return 0
    if owner is not None:
        async with await dbroles.connect(inst.socket_dir) as conn:
            ident = sql.Identifier(owner)
            try:
                await conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    ident, scram_verifier(owner_password)))
            except psycopg.errors.DuplicateObject:
                raise OperationError("conflict", f'role "{owner}" already exists in the new database') from None
            await conn.execute(sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(
                ident, sql.Identifier(dbroles.TENANT)))
            await conn.execute(sql.SQL("ALTER DATABASE postgres OWNER TO {}").format(ident))
            await conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(ident))
    if files:
        async with await dbroles.connect(inst.socket_dir, act_as=owner or dbroles.TENANT) as conn:
            try:
                await run_files_async(conn, files)
            except SqlFileError as e:
                raise OperationError("invalid", f"init file failed, nothing was created: {e}") from None
    return sum(len(f.statements) for f in files)


async def refresh_roles(manager: InstanceManager, db_id: str) -> None:
    """Re-read the roles of a running database now (saving roles.json)."""
    await manager.roles(db_id)


async def set_password(manager: InstanceManager, db_id: str, role: str, password: str) -> None:
    """ALTER ROLE ... PASSWORD (the SCRAM verifier, never the plaintext) on the running
    database, starting it if needed; the gateway's roles are refreshed at once. A database
    started for this is stopped again, which saves the new roles as a version."""

    was_running = db_id in manager.instances
    inst = await manager.acquire(db_id)
    try:
        async with await dbroles.connect(inst.socket_dir) as conn:
            await conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), scram_verifier(password)))
        await refresh_roles(manager, db_id)
    finally:
        manager.release(inst)
    if not was_running:
        await manager.stop(db_id, "password set")


def locked_elsewhere(catalog: LocalCatalog, db_id: str) -> bool:
    """Whether another process (a gateway) holds the database's instance lock."""
    try:
        catalog.lock(db_id).acquire().release()
    except DatabaseBusy:
        return True
    except (OSError, storage_errors.StorageError):
        return False
    return False


async def count_connections(settings: Settings, db_id: str) -> int | None:
    """Client connections of a database another process runs, from its pg_stat_activity
    over the private socket (None if it cannot be reached)."""
    try:
        async with await dbroles.connect(settings.socket_path / db_id, app="pgsni-info") as conn:
            # the gateway's own connections (role reader, WAL shipper) log in as its admin
            # role, which no client may use
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                     "'client backend' AND pid <> pg_backend_pid() AND "
                                     "usename IS DISTINCT FROM %s", (dbroles.ADMIN,))
            return int((await cur.fetchone())[0])
    except (psycopg.Error, OSError):
        return None


def local_pg_major(catalog: LocalCatalog, db_id: str) -> str | None:
    try:
        return (catalog.pgdata(db_id) / "PG_VERSION").read_text().strip()
    except OSError:
        return None


async def verify(manager: InstanceManager, db_id: str) -> Verified:
    """Re-read the current stored version (archive size and sha256, every file's sha256, into
    a scratch directory that is removed), then start the database and run SELECT 1."""
    problems: list[str] = []
    archive_ok, files, version = False, 0, None
    try:
        cur = await manager.databases.current(db_id, fresh=True)
    except storage_errors.StorageError as e:
        cur = None
        problems.append(f"reading storage failed: {e}")
    if cur is not None:
        version = cur.manifest.version
        work = manager.catalog.root / f".verify-{db_id}-{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        try:
            await manager.databases.store.restore(cur.manifest, work / "pgdata")
            archive_ok, files = True, cur.manifest.file_count
        except storage_errors.StorageError as e:
            problems.append(f"stored version {version} is damaged: {e}")
        finally:
            await remove_tree(work)
    elif not problems:
        problems.append("no stored version (it was never saved)")
    started = query_ok = False
    was_running = db_id in manager.instances
    try:
        inst = await manager.acquire(db_id)
        started = True
        try:
            async with await dbroles.connect(inst.socket_dir) as conn:
                row = await (await conn.execute("SELECT 1")).fetchone()
                query_ok = row == (1,)
        finally:
            manager.release(inst)
        if not was_running:
            await manager.stop(db_id, "verified")
    except (GatewayError, psycopg.Error, OSError) as e:
        problems.append(f"starting the database or querying it failed: {e}")
    ok = archive_ok and started and query_ok
    return Verified(db_id, version, ok, archive_ok, files, started, query_ok, problems)
