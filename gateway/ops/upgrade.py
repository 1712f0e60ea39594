"""`pgsni db upgrade ID --to MAJOR`: a database moved to a newer Postgres major with
pg_upgrade, all or nothing.

The database is held stopped (its unsaved changes saved first); pg_upgrade copies it into a
new data directory beside the data root (initdb'd by the new major's binaries as the bootstrap
superuser pgsni_admin, with the old one's checksum setting), run as the database's own OS
user; the result is brought to the roles layout of its new major (gateway/compute/securing.py: the
tenant gets CREATEROLE from 16 on), analyzed, stored as a new version and renamed into
place. The version before stays in storage (`db restore` brings it back); any failure leaves
the database as it was and nothing stored."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from gateway.compute import dbroles, pgcontrol, securing
from gateway.compute.instances import InstanceManager
from gateway.compute.pgbins import PgInstall, PgNotInstalled, pgdata_major
from gateway.compute.postgres import SAFE_SETTINGS, PostgresProcess
from storage import roles as roles_mod
from storage.atomic import remove_tree
from storage.errors import CopyError
from storage.local import copy_tree
from storage.osuser import RunAs, clean_env

from .uploads import store_and_swap


class UpgradeError(Exception):
    """The upgrade could not be done; nothing was changed. The message says why."""


@dataclass
class Upgraded:
    id: str
    from_major: str
    to_major: str
    version: str  # the stored version holding the upgraded database
    previous_version: str | None  # the stored version before (db restore brings it back)


async def upgrade(manager: InstanceManager, db_id: str, to_major: str) -> Upgraded:
    installs = manager.installs
    try:
        new = installs.get(to_major)
    except PgNotInstalled as e:
        raise UpgradeError(str(e)) from None
    async with manager.stopped(db_id, f"upgrading to Postgres {to_major}") as held:
        catalog, databases = manager.catalog, manager.databases
        if not catalog.exists(db_id):
            await held.restore_local()
        await held.save_now(note=f"saved before the upgrade to Postgres {to_major}")
        pgdata = catalog.pgdata(db_id)
        old = installs.get(pgdata_major(pgdata))
        if int(new.major) <= int(old.major):
            raise UpgradeError(f'database "{db_id}" is Postgres {old.major}: upgrade goes to a newer major')
        if not dbroles.secured(catalog.roles(db_id)):
            raise UpgradeError(f'database "{db_id}" is not secured yet: run `pgsni db secure {db_id}` first')
        previous = databases.state(db_id).version
        run_as = await asyncio.to_thread(manager.uids.run_as, db_id) if manager.uids else catalog.run_as
        build = catalog.root / f".upgrade-{secrets.token_hex(4)}"
        try:
            roles = await _build(manager, old, new, pgdata, build, run_as)
            version = await store_and_swap(held, build, roles, replace=True,
                                           note=f"pgsni db upgrade {old.major} -> {new.major}",
                                           before="saved before db upgrade")
        finally:
            await remove_tree(build)
    return Upgraded(db_id, old.major, new.major, version, previous)


async def _build(manager: InstanceManager, old: PgInstall, new: PgInstall, pgdata: Path, build: Path,
                 run_as: RunAs) -> dict[str, roles_mod.Role]:
    """`build/pgdata`: the upgraded copy, secured for its major; returns its roles."""
    s = manager.settings
    manager.catalog.run_as.make_dir(build, 0o711)
    work = run_as.make_dir(build / "work")  # pg_upgrade's own files and sockets
    target = build / "pgdata"
    source = await _scratch_copy(manager, old, pgdata, build, run_as)
    await asyncio.to_thread(_pg_upgrade, old, new, source, target, work, run_as)
    for scratch in (work, source, target / "pg_upgrade_output.d"):
        await remove_tree(scratch)
    manager.make_socket_root()
    try:
        await securing.secure(new.bindir, target, run_as, s.socket_path / f"ug-{build.name[-8:]}",
                              build / "postgres.log", options=s.postgres_options, timeout=s.start_timeout)
    except securing.SecureError as e:
        raise UpgradeError(str(e)) from None
    process = PostgresProcess(new.bindir, target, s.socket_path / f"ug-{build.name[-8:]}",
                              build / "postgres.log", run_as, s.postgres_options)
    await process.start(s.start_timeout)
    try:
        async with await dbroles.connect(process.socket_dir) as conn:
            databases = [r[0] for r in await (await conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn")).fetchall()]
            roles = await dbroles.read_roles(conn)
        for dbname in databases:  # planner statistics for the new major
            async with await dbroles.connect(process.socket_dir, dbname) as conn:
                await conn.execute("ANALYZE")
    except psycopg.Error as e:
        raise UpgradeError(f"the upgraded database does not answer: {e}") from None
    finally:
        await process.stop(s.stop_timeout)
        shutil.rmtree(process.socket_dir, ignore_errors=True)
    await asyncio.to_thread(roles_mod.save, build / "roles.json", roles)
    return roles


# Attribute options a newer major's pg_dump carries over but its server refuses: Debian's
# 15.20 keeps one on every column, and 18's pg_dump (which pg_upgrade uses) dumps it
FOREIGN_ATTOPTIONS = ("pg_attver",)


async def _scratch_copy(manager: InstanceManager, old: PgInstall, pgdata: Path, build: Path,
                        run_as: RunAs) -> Path:
    """A copy of the old data directory for pg_upgrade to read (the database's own copy is
    not touched), with the catalog's attribute options that the new major refuses removed,
    and without its configuration files: pg_upgrade starts the old server with only a few of
    the settings every other start pins (SAFE_SETTINGS), and what an imported archive left in
    them (`ssl_passphrase_command`, a shell command; `dynamic_library_path`, `jit_provider`,
    includes) would act. The new major's files come from its initdb, as always."""
    s, scratch = manager.settings, build / "old"
    try:
        await asyncio.to_thread(copy_tree, pgdata, scratch)
    except CopyError as e:
        raise UpgradeError(f"cannot copy the database for pg_upgrade: {e.stderr[-300:]}") from e
    run_as.write_file(scratch / "postgresql.conf", "# pgsni: pg_upgrade's copy, no settings of its own\n")
    run_as.write_file(scratch / "postgresql.auto.conf", "")
    process = PostgresProcess(old.bindir, scratch, s.socket_path / f"uo-{build.name[-8:]}",
                              build / "postgres.log", run_as, s.postgres_options, maintenance=True)
    await process.start(s.start_timeout)
    try:
        async with await dbroles.connect(process.socket_dir) as conn:
            names = [r[0] for r in await (await conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn")).fetchall()]
        patterns = [f"{name}=%" for name in FOREIGN_ATTOPTIONS]
        for dbname in names:
            async with await dbroles.connect(process.socket_dir, dbname) as conn:
                await conn.execute(
                    "UPDATE pg_attribute SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o "
                    "WHERE NOT o LIKE ANY(%s)), '{}') WHERE attoptions IS NOT NULL AND "
                    "EXISTS (SELECT 1 FROM unnest(attoptions) o WHERE o LIKE ANY(%s))", (patterns, patterns))
    except psycopg.Error as e:
        raise UpgradeError(f"cannot prepare the copy for pg_upgrade: {e}") from None
    finally:
        await process.stop(s.stop_timeout)
        shutil.rmtree(process.socket_dir, ignore_errors=True)
    return scratch


def _pg_upgrade(old: PgInstall, new: PgInstall, pgdata: Path, target: Path, work: Path,
                run_as: RunAs) -> None:
    kw = dict(capture_output=True, text=True, cwd=str(work), **run_as.popen_kwargs())
    checksums = pgcontrol.read(old.bindir, pgdata, run_as).checksums
    init = [str(new.bindir / "initdb"), "-D", str(target), "-U", dbroles.ADMIN, "-E", "UTF8",
            "--locale=C.UTF-8", "--no-instructions", "--data-checksums" if checksums else
            ("--no-data-checksums" if int(new.major) >= 18 else "")]
    done = subprocess.run([a for a in init if a], env=clean_env(), **kw)
    if done.returncode != 0:
        raise UpgradeError(f"initdb for Postgres {new.major} failed: {done.stderr.strip()[-500:]}")
    # pg_upgrade starts both servers itself on a socket in `work` (0700, the database's OS
    # user's) and logs in as pgsni_admin: trusted there, for the length of the upgrade only
    for data in (pgdata, target):
        run_as.write_file(data / "pg_hba.conf", f"local all {dbroles.ADMIN} trust\nlocal all all reject\n")
    pins = " ".join(f"-c {k}={v}" for k, v in SAFE_SETTINGS.items()
                    if k in ("archive_mode", "shared_preload_libraries", "session_preload_libraries",
                             "local_preload_libraries"))
    argv = [str(new.bindir / "pg_upgrade"), "-b", str(old.bindir), "-B", str(new.bindir),
            "-d", str(pgdata), "-D", str(target), "-U", dbroles.ADMIN, "-s", str(work),
            "-p", "50432", "-P", "50433", "-o", pins, "-O", pins, "--copy"]
    done = subprocess.run(argv, env=clean_env(), **kw)
    if done.returncode != 0:
        raise UpgradeError(f"pg_upgrade from {old.major} to {new.major} failed: "
                           f"{_reason(done.stdout + done.stderr, target)}")


def _reason(output: str, target: Path) -> str:
    """pg_upgrade's own words for what stopped it (and the files it names, e.g. the libraries
    the new major lacks)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    failed = [ln for ln in lines if "fatal" in ln.lower() or "error" in ln.lower()
              or "missing" in ln.lower() or "could not" in ln.lower()]
    detail = []
    for report in sorted(target.glob("pg_upgrade_output.d/*/*.txt")):  # e.g. loadable_libraries.txt
        detail += [ln.strip() for ln in report.read_text(errors="replace").splitlines()[:10] if ln.strip()]
    for log in sorted(target.glob("pg_upgrade_output.d/*/log/*.log")):
        detail += [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                   if "FATAL" in ln or "ERROR" in ln][-3:]
    return " ".join(failed[-3:] + detail or lines[-3:])[:1500]
