"""`pgsni db ...`: the database lifecycle commands. Each one calls `gateway/ops/operations.py`
through the offline bundle and prints the result (JSON with --json); mutating commands
honour --dry-run. Other modules add commands with `db.add_command(...)` (see cli.py)."""

from __future__ import annotations

import asyncio
import contextlib

import click

from gateway import admintoken

from .common import (
    as_json, emit_json, human_bytes, note, opt, run_offline, say, show_plan, table, working)


# a point in time to restore or fork to, with its zone (2026-12-03T12:00:00+00:00)
POINT_IN_TIME = click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"])
LSN_HELP = ("WAL location (as pg_current_wal_lsn() shows it, e.g. 0/16B3748): the WAL up to and "
            "including the record that begins there")


@click.group()
def db() -> None:
    """Databases: create, inspect, fork, snapshot, restore, verify, delete."""


def _dry(ctx: click.Context) -> bool:
    return bool(opt(ctx, "dry_run"))


def _done(ctx: click.Context, result) -> bool:
    """Print a dry run's plan (and say so), or hand back to the caller to print the result."""
    from gateway.ops.results import Plan

    if isinstance(result, Plan):
        show_plan(ctx, result)
        return True
    if as_json(ctx):
        emit_json(result.to_dict())
        return True
    return False


@db.command("create")
@click.argument("db_id", metavar="ID")
@click.option("--password", envvar="PGSNI_NEW_PASSWORD", help="Password for role postgres (default: generated).")
@click.option("--from", "source", metavar="SOURCE",
              help="Start from this PGDATA archive (.tar, .tar.gz, .tar.zst): a file path, "
                   "s3://bucket/key or an https:// URL, instead of an empty database.")
@click.option("--sha256", metavar="HEX", help="With --from: the archive's sha256; a mismatch creates nothing.")
@click.option("--init", "init_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE.sql",
              help="SQL file to run in the new database (repeatable, run in order, each in one "
                   "transaction). All are parsed first: a syntax error (file:line:column) "
                   "creates nothing; a failing statement removes the new database again.")
@click.option("--owner", metavar="ROLE",
              help="Also create login role ROLE with a generated password (printed once): it owns "
                   "database postgres and schema public, and the --init files run as ROLE "
                   "(SET ROLE), so the objects they create belong to it.")
@click.option("--pg", "major", metavar="MAJOR",
              help="Postgres major version (default: the pg_major setting, else 18 where "
                   "installed, else the newest). Not with --from: an archive keeps its own.")
@click.pass_context
def db_create(ctx: click.Context, db_id: str, password: str | None, source: str | None,
              sha256: str | None, init_files: tuple[str, ...], owner: str | None,
              major: str | None) -> None:
    """Create database ID; prints the password of role postgres once."""
    if sha256 is not None:
        from gateway.ops.create_from import check_sha256

        sha256 = check_sha256(source, sha256)

    async def create(off):
        # --from shows its own progress bar (rich allows one live display at a time)
        with working(ctx, f"creating {db_id}") if source is None else contextlib.nullcontext():
            return await off.ops.create(db_id, password, source, sha256, init_files, owner,
                                        major=major, dry_run=_dry(ctx))

    r = run_offline(ctx, create)
    if _done(ctx, r):
        return
    click.echo(f'created database "{db_id}" (Postgres {r.pg_major})\nuser:     postgres\npassword: {r.password}')
    if r.owner:
        click.echo(f"owner:    {r.owner}\nowner password: {r.owner_password}")
    if r.init_files:
        click.echo(f"ran {r.statements} statement(s) from {len(r.init_files)} file(s)")
    click.echo("(shown once; store it now)")
    if r.version is None:
        note(ctx, "warning: the first version is not in storage yet (storage unavailable?); "
                  "a running gateway retries")


@db.command("list")
@click.pass_context
def db_list(ctx: click.Context) -> None:
    """List databases, on local disk and in storage."""
    rows = run_offline(ctx, lambda off: off.ops.list())
    if as_json(ctx):
        emit_json([r.to_dict() for r in rows])
        return
    out = []
    for r in rows:
        where = f"remote {r.remote}" if r.remote else "+".join(w for w in ("local", "stored") if getattr(r, w))
        flags = [f for f, on in (("running", r.running), ("unsaved changes", r.unsaved_changes)) if on]
        out.append((r.id, where + (f" ({', '.join(flags)})" if flags else "")))
    table(ctx, "databases", ("id", "where"), out)


@db.command("info")
@click.argument("db_id", metavar="ID")
@click.pass_context
def db_info(ctx: click.Context, db_id: str) -> None:
    """Size, versions, running or not, connections, last used."""
    r = run_offline(ctx, lambda off: off.ops.info(db_id))
    if as_json(ctx):
        emit_json(r.to_dict())
        return
    rows = [("id", r.id), ("state", r.state), ("running", "yes" if r.running else "no"),
            ("connections", "unknown" if r.connections is None else r.connections),
            ("last used", r.last_used or "never"),
            ("local copy", human_bytes(r.local_bytes) if r.local else "none"),
            ("unsaved changes", "yes" if r.unsaved_changes else "no"),
            ("current version", r.version or "none"),
            ("stored size", human_bytes(r.stored_bytes) if r.stored else "none"),
            ("versions", len(r.versions)), ("postgres", r.pg_major or "")]
    rows += [("set aside", path) for path in r.set_aside]  # changes storage does not have
    if r.wal:
        rows += [("WAL in storage", f"{r.wal['stored_lsn'] or 'none yet'} (timeline {r.wal['timeline']})"),
                 ("WAL not yet stored", f"{human_bytes(r.wal['lag_bytes'] or 0)}, {r.wal['lag_seconds']} s"
                  + (f"; {r.wal['upload_errors']} failed upload round(s): {r.wal['last_error']}"
                     if r.wal["upload_errors"] else ""))]
        if r.wal.get("lost_bytes"):
            rows.append(("WAL lost to shipping", human_bytes(r.wal["lost_bytes"])
                         + (f"; restores reach {r.wal['lost_after']} until a base backup after it is "
                            "stored" if r.wal.get("lost_after") else "; a base backup after it is stored")))
    if r.restorable:
        rows.append(("restorable", f"{r.restorable['from']} to {r.restorable['to']}"
                     + ("" if r.restorable["rpo_seconds"] is None else " (now minus the WAL lag)")))
    table(ctx, f"database {r.id}", ("", ""), [(f"{k}:", v) for k, v in rows])


@db.command("delete")
@click.argument("db_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def db_delete(ctx: click.Context, db_id: str, yes: bool) -> None:
    """Delete database ID: its local copy and every stored version."""
    plan = run_offline(ctx, lambda off: off.ops.delete(db_id, dry_run=True))
    if _dry(ctx):
        show_plan(ctx, plan)
        return
    if not yes:
        for change in plan.changes:
            click.echo(f"  - {change}", err=True)
        click.confirm(f'Delete database "{db_id}" and all its versions?', abort=True)
    r = run_offline(ctx, lambda off: off.ops.delete(db_id))
    if not _done(ctx, r):
        click.echo(f'deleted database "{db_id}"')


@db.command("fork")
@click.argument("src", metavar="SRC")
@click.argument("new", metavar="NEW")
@click.option("--version", "version", help="Version of SRC to start from (default: its current one; "
                                           "unsaved local changes of SRC are saved first).")
@click.option("--time", "time", type=POINT_IN_TIME,
              help="SRC as it was at this time, with its zone: the transactions committed before it "
                   "(its version saved before, plus the WAL durability=async stores).")
@click.option("--lsn", "lsn", metavar="LSN", help=f"SRC as it was at this {LSN_HELP}.")
@click.pass_context
def db_fork(ctx: click.Context, src: str, new: str, version: str | None, time, lsn: str | None) -> None:
    """New database NEW from a stored version of SRC, or from SRC at a past moment (--time,
    --lsn). A version's archive is copied inside storage (never downloaded); a past moment is
    built here from the version saved before it and the stored WAL, and stored as NEW's first
    version, and SRC is only read (it may keep running). NEW starts with SRC's roles and
    passwords and is independent of it."""
    if sum(x is not None for x in (version, time, lsn)) > 1:
        raise click.UsageError("give at most one of --version, --time and --lsn")

    async def fork(off):
        with working(ctx, f"forking {src} into {new}"):
            return await off.ops.fork(src, new, version, time=time, lsn=lsn, dry_run=_dry(ctx))

    r = run_offline(ctx, fork)
    if _done(ctx, r):
        return
    if r.source_saved:
        click.echo(f"saved the unsaved changes of {src} as version {r.source_saved}")
    at = f" at {r.time or f'LSN {r.lsn}'} (version {r.source_version} and its WAL)" \
        if r.time or r.lsn else f" version {r.source_version}"
    click.echo(f'forked "{src}"{at} into "{new}" (version {r.version}, {human_bytes(r.bytes)})')


@db.command("snapshot")
@click.argument("db_id", metavar="ID")
@click.option("--stop", is_flag=True, help="Of a running database: stop it and save the stopped "
              "copy instead of an online base backup.")
@click.pass_context
def db_snapshot(ctx: click.Context, db_id: str, stop: bool) -> None:
    """Save the local copy of ID to storage as a new version (if it changed); a running
    database gets an online base backup (docs/storage.md)."""

    async def snap(off):
        from gateway.ops.results import OperationError

        with working(ctx, f"saving {db_id}"):
            try:
                return await off.ops.snapshot(db_id, stop=stop, dry_run=_dry(ctx))
            except OperationError as e:
                if e.kind != "busy" or stop or _dry(ctx) or not off.settings.admin_port:
                    raise
                # a gateway runs it, perhaps this data root's: that one takes a base backup
                return await asyncio.to_thread(_snapshot_by_gateway, off.settings, db_id, e)

    r = run_offline(ctx, snap)
    if _done(ctx, r):
        return
    if r.base_backup:
        click.echo(f"stored an online base backup of {db_id} as version {r.version} (it keeps running)")
    elif r.saved:
        click.echo(f"saved {db_id} as version {r.version}")
    else:
        click.echo("no changes since the stored version; nothing to do")


def _snapshot_by_gateway(settings, db_id: str, busy):
    """`db snapshot` of a database the gateway of these settings runs, through its admin API
    (POST /v1/databases/{id}/snapshot: an online base backup). The `busy` error stands when
    that gateway does not answer."""
    import json
    import urllib.error
    import urllib.request

    from gateway.ops.results import OperationError, Snapshot

    host = "127.0.0.1" if settings.admin_host in ("0.0.0.0", "::", "") else settings.admin_host
    req = urllib.request.Request(f"http://{host}:{settings.admin_port}/v1/databases/{db_id}/snapshot",
                                 method="POST", data=b"")
    try:
        token = admintoken.for_client(settings)
    except admintoken.TokenFileError as e:
        raise OperationError("failed", str(e)) from None
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=6 * 3600) as resp:
            return Snapshot(**json.loads(resp.read()))
    except urllib.error.HTTPError as e:
        try:
            said = json.loads(e.read())
            raise OperationError(said["error"], said["message"], hint=said.get("hint")) from None
        except (ValueError, KeyError, TypeError, AssertionError):
            raise busy from None
    except (OSError, ValueError, TypeError):
        raise busy from None


@db.command("versions")
@click.argument("db_id", metavar="ID")
@click.pass_context
def db_versions(ctx: click.Context, db_id: str) -> None:
    """List the stored versions of ID (newest last)."""
    infos = run_offline(ctx, lambda off: off.ops.versions(db_id))
    if not infos:
        raise click.ClickException(f'database "{db_id}" has no stored versions')
    if as_json(ctx):
        emit_json([i.to_dict() for i in infos])
        return
    table(ctx, f"versions of {db_id}", ("version", "bytes", ""),
          [(i.version, f"{i.size:>12}", "current" if i.current else "") for i in infos])


@db.command("restore")
@click.argument("db_id", metavar="ID")
@click.option("--version", "version", help="Version to make current (see `db versions`).")
@click.option("--time", "time", type=POINT_IN_TIME,
              help="Point in time to restore to, with its time zone (2026-12-03T12:00:00+00:00): "
                   "the transactions committed before it (needs the WAL durability=async stores).")
@click.option("--lsn", "lsn", metavar="LSN", help=f"Restore to this {LSN_HELP} (needs that WAL too).")
@click.pass_context
def db_restore(ctx: click.Context, db_id: str, version: str | None, time, lsn: str | None) -> None:
    """Roll ID back to an earlier version, or to a point in time or WAL location. Unsaved
    changes become a new version first, so the restore can itself be undone. The database must
    not be open in a running gateway."""
    if sum(x is not None for x in (version, time, lsn)) != 1:
        raise click.UsageError("give one of --version, --time and --lsn")

    async def restore(off):
        with working(ctx, f"restoring {db_id}"):
            return await off.ops.restore(db_id, version, time=time, lsn=lsn, dry_run=_dry(ctx))

    r = run_offline(ctx, restore)
    if _done(ctx, r):
        return
    if r.saved_version is not None:
        click.echo(f"saved the current state as version {r.saved_version}")
    if r.time is not None or r.lsn is not None:
        click.echo(f"{db_id} is now at version {r.version}: version {r.base} with the WAL up to "
                   + (r.time or f"LSN {r.lsn}"))
    elif r.version != r.base:
        click.echo(f"{db_id} is now at version {r.version} (version {r.base} on a new timeline)")
    else:
        click.echo(f"{db_id} is now at version {r.version}")


@db.command("verify")
@click.argument("db_id", metavar="ID")
@click.pass_context
def db_verify(ctx: click.Context, db_id: str) -> None:
    """Check ID: its current stored version is read back and every checksum compared with the
    manifest, the database starts, and SELECT 1 answers. Exit status 1 if anything fails."""

    async def verify(off):
        with working(ctx, f"verifying {db_id}"):
            return await off.ops.verify(db_id, dry_run=_dry(ctx))

    r = run_offline(ctx, verify)
    if not _done(ctx, r):
        mark = {True: "ok", False: "FAILED"}
        click.echo(f"snapshot {r.version or '-'}: {mark[r.archive_ok]} ({r.files_checked} files checked)")
        click.echo(f"start:    {mark[r.started]}\nSELECT 1: {mark[r.query_ok]}")
        for p in r.problems:
            click.echo(f"problem:  {p}", err=True)
    if getattr(r, "ok", True) is False:
        raise SystemExit(1)


@db.command("password")
@click.argument("db_id", metavar="ID")
@click.option("--role", default="postgres", show_default=True, help="Role whose password to set.")
@click.option("--password", envvar="PGSNI_NEW_PASSWORD",
              help="The new password (default: generated and printed once).")
@click.pass_context
def db_password(ctx: click.Context, db_id: str, role: str, password: str | None) -> None:
    """Set or rotate a role's password. The gateway accepts only the new one from then on
    (it is saved with the database's roles and stored as a new version)."""
    r = run_offline(ctx, lambda off: off.ops.set_password(db_id, role, password, dry_run=_dry(ctx)))
    if _done(ctx, r):
        return
    say(ctx, f'new password for role "{r.role}" of database "{db_id}"\npassword: {r.password}\n'
             "(shown once; store it now)")


@db.command("upgrade")
@click.argument("db_id", metavar="ID")
@click.option("--to", "to", required=True, metavar="MAJOR", help="The Postgres major to move to (installed here).")
@click.option("--force", is_flag=True, help="Disconnect its clients (it is stopped for the upgrade).")
@click.pass_context
def db_upgrade(ctx: click.Context, db_id: str, to: str, force: bool) -> None:
    """Move database ID to a newer Postgres major with pg_upgrade: all or nothing, and the
    version before stays in storage (`db restore` brings it back)."""

    async def upgrade(off):
        with working(ctx, f"upgrading {db_id} to Postgres {to}"):
            return await off.ops.upgrade(db_id, to, force=force, dry_run=_dry(ctx))

    r = run_offline(ctx, upgrade)
    if _done(ctx, r):
        return
    say(ctx, f"{db_id}: Postgres {r.from_major} -> {r.to_major}, stored as version {r.version}"
             + (f" (the one before: {r.previous_version})" if r.previous_version else ""))


@db.command("secure")
@click.argument("db_ids", metavar="ID...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every database that needs it.")
@click.option("--drop-untrusted", is_flag=True,
              help="Drop routines in untrusted languages and file_fdw tables instead of refusing "
                   "(nothing that depends on them is dropped: that fails).")
@click.pass_context
def db_secure(ctx: click.Context, db_ids: tuple[str, ...], every: bool, drop_untrusted: bool) -> None:
    """Bring databases made by an older pgsni, whose clients logged in as the superuser
    `postgres`, to today's roles: `postgres` keeps its password and what it owned but loses
    SUPERUSER, and the gateway keeps the superuser to itself. The gateway refuses such a
    database until this has run. Unsaved changes are saved first and the version before
    stays in storage (`db restore` brings it back)."""
    if every == bool(db_ids):
        raise click.UsageError("give database ids or --all")

    async def secure(off):
        ids = list(db_ids) or [s.id for s in await off.ops.list() if s.remote is None]
        results = []
        for db_id in ids:
            with working(ctx, f"securing {db_id}"):
                results.append(await off.ops.secure(db_id, drop_untrusted=drop_untrusted,
                                                    dry_run=_dry(ctx)))
        return results

    results = run_offline(ctx, secure)
    if as_json(ctx):
        emit_json([r.to_dict() for r in results])
        return
    for r in results:
        if _done(ctx, r):
            continue
        if not r.changed:
            click.echo(f"{r.id}: already secured")
            continue
        click.echo(f"{r.id}: secured, stored as version {r.version}" +
                   (f"; {r.renamed!r} is now the gateway's pgsni_admin" if r.renamed else ""))
        for label, items in (("no longer superuser", r.demoted), ("revoked", r.revoked),
                             ("dropped", r.dropped), ("disabled", r.disabled),
                             ("settings reset", r.settings_reset),
                             ("left as it was", r.left)):
            for item in items:
                click.echo(f"  {label}: {item}")


from .data import dump, migrate, upload  # noqa: E402  (db upload / dump / migrate)

for _cmd in (upload, dump, migrate):
    db.add_command(_cmd)
