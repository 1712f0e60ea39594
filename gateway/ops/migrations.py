"""`db migrate`: Flyway-style versioned migrations. Files `V<version>__<description>.sql`
(versions like 1, 1.1, 2_1, compared numerically) are all parsed before anything runs, then the
pending ones are applied in order, each in its own transaction together with its row in the
history table `pgsni_schema_history`. An applied file whose checksum changed is an error."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from gateway.compute import dbroles
from gateway.compute.instances import InstanceManager

from . import sqlfiles
from .sqlfiles import Statement

HISTORY = "pgsni_schema_history"
_TABLE = f"public.{HISTORY}"
_NAME = re.compile(r"^V(?P<version>\d+(?:[._]\d+)*)__(?P<description>.+)\.sql$")
_LOCK_KEY = 0x70677369  # advisory lock: one migrate at a time per database ("pgsi")

CREATE_HISTORY = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    installed_rank integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version text NOT NULL UNIQUE,
    description text NOT NULL,
    script text NOT NULL,
    checksum text NOT NULL,
    installed_by text NOT NULL DEFAULT current_user,
    installed_on timestamptz NOT NULL DEFAULT now(),
    execution_ms integer NOT NULL,
    success boolean NOT NULL
)"""


class MigrationError(Exception):
    pass


class MigrationBusy(MigrationError):
    """Another migration of the same database holds its advisory lock."""


@dataclass
class Migration:
    version: str  # as written in the file name
    key: tuple[int, ...]  # for ordering: 1.10 after 1.9; trailing zeros dropped (1.0 == 1)
    description: str
    path: Path
    checksum: str
    statements: list[Statement] = field(default_factory=list)

    @property
    def script(self) -> str:
        return self.path.name


@dataclass
class Applied:
    version: str
    script: str
    checksum: str
    installed_on: str
    execution_ms: int = 0
    statements: int = 0


@dataclass
class Report:
    applied: list[Applied]  # before this run, from the history table
    pending: list[Migration]  # would run (dry run) or ran (then `ran` lists them)
    ran: list[Applied] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    history_exists: bool = False

    def summary(self, db_id: str, dry_run: bool) -> dict:
        """The run as JSON (`db migrate --json`, the admin API): versions applied before it,
        those pending, and what ran."""
        return {"id": db_id, "dry_run": dry_run,
                "applied_before": [a.version for a in self.applied],
                "pending": [m.version for m in self.pending],
                "ran": [asdict(a) for a in self.ran]}


def version_key(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.split(r"[._]", version)]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def checksum(text: str) -> str:
    """sha256 of the file's text with line endings normalised (a checkout with CRLF endings
    is the same migration)."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode()).hexdigest()


def discover(directory: Path) -> tuple[list[Migration], list[str]]:
    """The migrations in `directory`, parsed and in version order, and warnings about files
    that are not migrations. SqlFileError for a syntax error, MigrationError for a bad name."""
    if not directory.is_dir():
        raise MigrationError(f"{directory} is not a directory")
    found: dict[tuple[int, ...], Migration] = {}
    warnings = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".sql":
            continue
        m = _NAME.match(path.name)
        if m is None:
            if path.name[:1] in "Vv":
                raise MigrationError(f"{path}: not a migration name; expected V<version>__<description>.sql "
                                     "(two underscores), e.g. V1__create_users.sql or V1.1__add_index.sql")
            warnings.append(f"{path.name}: ignored (not V<version>__<description>.sql)")
            continue
        text = sqlfiles.read_sql(path)
        mig = Migration(m["version"], version_key(m["version"]), m["description"].replace("_", " "),
                        path, checksum(text), sqlfiles.parse_sql_text(text, path))
        if mig.key in found:
            raise MigrationError(f"{path.name} and {found[mig.key].path.name} have the same version")
        found[mig.key] = mig
    return [found[k] for k in sorted(found)], warnings


def plan(migrations: list[Migration], applied: list[Applied]) -> tuple[list[Migration], list[str]]:
    """Pending migrations after checking the history: an applied migration must be unchanged,
    and none may be older than the latest applied one."""
    by_key = {m.key: m for m in migrations}
    warnings = []
    for row in applied:
        mig = by_key.pop(version_key(row.version), None)
        if mig is None:
            warnings.append(f"version {row.version} ({row.script}) was applied but its file is not in the directory")
        elif mig.checksum != row.checksum:
            raise MigrationError(
                f"{mig.path}: checksum differs from the one recorded when version {row.version} was "
                f"applied on {row.installed_on} ({row.checksum[:12]}..., now {mig.checksum[:12]}...); "
                "an applied migration must not be edited: put the change in a new migration")
    latest = max((version_key(r.version) for r in applied), default=())
    pending = sorted(by_key.values(), key=lambda m: m.key)
    for mig in pending:
        if mig.key < latest:
            raise MigrationError(f"{mig.path}: version {mig.version} is older than the latest applied "
                                 f"version but was never applied; give it a version after that one")
    return pending, warnings


async def _history(conn: psycopg.AsyncConnection) -> tuple[bool, list[Applied]]:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_TABLE,))
    if not (await cur.fetchone())[0]:
        return False, []
    cur = await conn.execute(f"SELECT version, script, checksum, installed_on::text, execution_ms "
                             f"FROM {_TABLE} WHERE success ORDER BY installed_rank")
    return True, [Applied(*row) for row in await cur.fetchall()]


async def migrate(manager: InstanceManager, db_id: str, directory: Path, *, dbname: str = "postgres",
                  dry_run: bool = False, on_applied=None) -> Report:
    """Apply the pending migrations of `directory` to database `dbname` of `db_id` (started if
    needed; its changes are saved when it stops). With `dry_run`, only report."""
    migrations, warnings = discover(directory)  # every file parsed before anything starts
    inst = await manager.acquire(db_id)
    try:
        try:  # as the tenant role: a migration can do what its owner can, nothing more
            conn = await dbroles.connect(inst.socket_dir, dbname, act_as=dbroles.TENANT,
                                         app="pgsni migrate")
        except psycopg.OperationalError as e:
            raise MigrationError(f'cannot connect to database "{dbname}" of "{db_id}": '
                                 f"{str(e).strip().splitlines()[-1]}") from None
        async with conn:
            got = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,))).fetchone()
            if not got[0]:
                raise MigrationBusy(f'another migration of "{db_id}" is running')
            exists, applied = await _history(conn)
            pending, more = plan(migrations, applied)
            report = Report(applied, pending, warnings=warnings + more, history_exists=exists)
            if dry_run or not pending:
                return report
            await conn.execute(CREATE_HISTORY)
            for mig in pending:
                report.ran.append(await _apply(conn, mig))
                if on_applied is not None:
                    on_applied(report.ran[-1])
            return report
    finally:
        manager.release(inst)


async def _apply(conn: psycopg.AsyncConnection, mig: Migration) -> Applied:
    started = time.monotonic()
    try:
        async with conn.transaction():
            await sqlfiles.execute_async(conn, str(mig.path), mig.statements)
            ms = int((time.monotonic() - started) * 1000)
            cur = await conn.execute(
                f"INSERT INTO {_TABLE} (version, description, script, checksum, execution_ms, success) "
                "VALUES (%s, %s, %s, %s, %s, true) RETURNING installed_on::text",
                (mig.version, mig.description, mig.script, mig.checksum, ms))
            installed_on = (await cur.fetchone())[0]
    except sqlfiles.Failed as failed:
        raise failed.error from None
    return Applied(mig.version, mig.script, mig.checksum, installed_on, ms, len(mig.statements))

