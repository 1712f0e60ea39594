"""`pgsni db upload | dump | migrate`: moving data into and out of a database, and versioned
schema migrations. Thin commands over gateway/ops/uploads.py, pgtools.py and migrations.py."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from .common import as_json, check_id, emit_json, human_bytes, note, opt, run_offline, say, working


def _dry(ctx: click.Context, local: bool) -> bool:
    return local or bool(opt(ctx, "dry_run"))


def _clear_errors():
    """Our own errors as CLI errors (the runner turns storage and gateway errors itself)."""
    from gateway.ops.migrations import MigrationError
    from gateway.ops.pgtools import ToolError
    from gateway.ops.sqlfiles import SqlFileError
    from gateway.ops.uploads import UploadError

    return (UploadError, MigrationError, ToolError, SqlFileError)


async def _guarded(coro):
    try:
        return await coro
    except _clear_errors() as e:
        raise click.ClickException(str(e)) from None


def _run(ctx: click.Context, body):
    return run_offline(ctx, lambda off: _guarded(body(off)))


# --- upload ---------------------------------------------------------------------------------------
@click.command("upload")
@click.argument("db_id", metavar="ID")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--yes", is_flag=True, help="Replace an existing database without asking.")
@click.option("--password", envvar="PGSNI_NEW_PASSWORD",
              help="New password for role postgres (default: a new database gets a generated one, "
                   "a replaced one keeps its password).")
@click.option("--dry-run", "local_dry", is_flag=True, help="Like the global --dry-run.")
@click.pass_context
def upload(ctx: click.Context, db_id: str, file: Path, yes: bool, password: str | None,
           local_dry: bool) -> None:
    """Create database ID, or replace it, from FILE: a PGDATA archive (tar, tar.gz, tar.zst), a
    pg_dump custom-format (or tar-format) dump, or a plain SQL dump, told apart by
    content. A replaced state stays in storage as an older version (see `db versions`)."""
    from gateway.ops import uploads

    check_id(db_id)
    dry = _dry(ctx, local_dry)

    async def body(off):
        plan = await uploads.plan(off.manager, db_id, file)
        if dry:
            return plan, None
        if plan.replace and not yes:
            click.confirm(f'Replace database "{db_id}" with {file}? Its current state stays '
                          "as an older version", abort=True, err=True)
        with working(ctx, f"loading {file.name} into {db_id}"):
            return plan, await uploads.upload(off.manager, plan, password)

    plan, done = _run(ctx, body)
    action = "replace" if plan.replace else "create"
    if done is None:
        if as_json(ctx):
            emit_json(asdict(plan) | {"action": action, "dry_run": True})
            return
        click.echo(f'dry run: would {action} database "{db_id}" from {file}: {plan.label} '
                   f"({human_bytes(plan.size)}); {plan.checked}")
        if plan.current_version:
            click.echo(f"  its current version {plan.current_version} would stay as an older version")
        click.echo("nothing was changed")
        return
    if as_json(ctx):
        emit_json({"id": db_id, "action": action, "kind": plan.kind, "version": done.version,
                   "previous_version": plan.current_version, "user": "postgres",
                   "password": done.password})
        return
    say(ctx, f'{"replaced" if plan.replace else "created"} database "{db_id}" from {plan.label}: '
             f"version {done.version}")
    if plan.current_version:
        note(ctx, f"the previous state is kept as version {plan.current_version} "
                  f"(pgsni db restore {db_id} --version {plan.current_version})")
    if done.password:
        say(ctx, f"user:     postgres\npassword: {done.password}\n(shown once; store it now)")


# --- dump -----------------------------------------------------------------------------------------
@click.command("dump")
@click.argument("db_id", metavar="ID")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["custom", "plain", "tar"]), default="custom",
              show_default=True, help="pg_dump format: custom (for pg_restore / db upload), plain "
                                      "SQL, or tar.")
@click.option("--database", "dbname", default="postgres", show_default=True,
              help="Database inside the instance to dump.")
@click.option("--no-owner", is_flag=True, help="pg_dump --no-owner: no ALTER ... OWNER TO.")
@click.option("--no-privileges", is_flag=True, help="pg_dump --no-privileges: no GRANT/REVOKE.")
@click.pass_context
def dump(ctx: click.Context, db_id: str, file: Path, fmt: str, dbname: str, no_owner: bool,
         no_privileges: bool) -> None:
    """Write a pg_dump of ID to FILE (atomically: complete or not at all). A dump holds no
    roles: for a plain dump to load into a new database whose roles differ, use --no-owner
    and --no-privileges (custom-format dumps are uploaded without owners and privileges)."""
    from gateway.ops.pgtools import dump as run_dump

    check_id(db_id)
    extra = ["--no-owner"] * no_owner + ["--no-privileges"] * no_privileges

    async def body(off):
        if not await off.databases.exists(db_id):
            raise click.ClickException(f'database "{db_id}" does not exist')
        if opt(ctx, "dry_run"):
            return None
        with working(ctx, f"dumping {db_id}"):
            return await run_dump(off.manager, db_id, file, fmt, dbname, extra)

    size = _run(ctx, body)
    if size is None:
        if as_json(ctx):
            emit_json({"id": db_id, "file": str(file), "format": fmt, "dry_run": True})
        else:
            click.echo(f"dry run: would write a {fmt}-format pg_dump of {db_id} to {file}\n"
                       "nothing was changed")
        return
    if as_json(ctx):
        emit_json({"id": db_id, "file": str(file), "format": fmt, "size": size})
    else:
        say(ctx, f"wrote a {fmt}-format pg_dump of {db_id} to {file} ({human_bytes(size)})")


# --- migrate --------------------------------------------------------------------------------------
@click.command("migrate")
@click.argument("db_id", metavar="ID")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of V<version>__<description>.sql files.")
@click.option("--database", "dbname", default="postgres", show_default=True,
              help="Database inside the instance to migrate.")
@click.option("--dry-run", "local_dry", is_flag=True, help="List what would run; change nothing.")
@click.pass_context
def migrate(ctx: click.Context, db_id: str, directory: Path, dbname: str, local_dry: bool) -> None:
    """Apply the pending migrations in --dir to ID, in version order, each in its own
    transaction, recorded in table pgsni_schema_history. Editing an applied migration is an
    error; a failing one is rolled back and stops the run."""
    from gateway.ops import migrations

    check_id(db_id)
    dry = _dry(ctx, local_dry)
    quiet_json = as_json(ctx)

    def applied(a) -> None:
        if not quiet_json:
            click.echo(f"applied {a.script} ({a.statements} statements, {a.execution_ms} ms)")

    async def body(off):
        migrations.discover(directory)  # syntax errors before the database is even started
        if not await off.databases.exists(db_id):
            raise click.ClickException(f'database "{db_id}" does not exist')
        return await migrations.migrate(off.manager, db_id, directory, dbname=dbname,
                                        dry_run=dry, on_applied=applied)

    report = _run(ctx, body)
    for w in report.warnings:
        note(ctx, f"warning: {w}")
    if as_json(ctx):
        emit_json(report.summary(db_id, dry))
        return
    if not report.pending:
        say(ctx, f"{db_id} is up to date ({len(report.applied)} migrations applied)")
        return
    if dry:
        click.echo(f"dry run: would apply {len(report.pending)} migration(s) to {db_id}:")
        for m in report.pending:
            click.echo(f"  {m.version}\t{m.script}\t({len(m.statements)} statements)")
        if not report.history_exists:
            click.echo(f"  and create table {migrations.HISTORY}")
        click.echo("nothing was changed")
        return
    say(ctx, f"{db_id}: applied {len(report.ran)} migration(s); now at version {report.ran[-1].version}")
