"""What every `pgsni` command shares: settings from the global options, logging, the offline
bundle of storage + instances for one command (`Offline`, `run_offline`), and output: JSON
for scripts (`--json`), plain lines when piped, rich tables and spinners on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any, Callable, Iterator, Sequence

import click

from gateway import logs
from gateway.config import ConfigError, Settings, load
from gateway.logs import printable


class Group(click.Group):
    """The CLI's command groups: an error's text may quote what a tenant wrote (a dump's RAISE,
    an object's name), so its control characters are escaped before it reaches the terminal."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            e.message = printable(e.message)
            raise


def settings_for(ctx: click.Context, **overrides) -> Settings:
    try:
        return load(ctx.obj["config"], **overrides)
    except ConfigError as e:
        raise click.ClickException(f"configuration: {e}") from None


def check_id(db_id: str) -> str:
    """A database id argument, or click's usage error (the rule is storage/ids.py's)."""
    from storage.ids import ID_RULE, valid_id

    if not valid_id(db_id):
        raise click.BadParameter(f"a database id is {ID_RULE}", param_hint="ID")
    return db_id


def setup_logging(level: str) -> None:
    """A one-shot command's log lines: text on stderr (control characters escaped)."""
    logs.setup(level, "text")


def command_log_level(ctx: click.Context) -> str:
    """Log level of a one-shot command: WARNING, INFO with -v, DEBUG with -vv, ERROR with -q."""
    obj = ctx.find_root().obj or {}
    if obj.get("quiet"):
        return "ERROR"
    return {0: "WARNING", 1: "INFO"}.get(obj.get("verbose", 0), "DEBUG")


def opt(ctx: click.Context, name: str) -> Any:
    return (ctx.find_root().obj or {}).get(name)


def catalog_for(settings: Settings):
    from gateway.compute.template import local_catalog

    return local_catalog(settings)


class Offline:
    """The storage and instance machinery without a listening gateway, for one CLI command.
    A database a running gateway has open is refused by its lock. `ops` is the lifecycle
    operations object (`gateway/ops/operations.py`) built from these."""

    def __init__(self, settings: Settings, *, prepare: bool = True) -> None:
        from storage.factory import open_backend

        from gateway.compute.instances import InstanceManager
        from gateway.ops.operations import Ops
        from gateway.app import open_databases

        self.settings = settings
        self.catalog = catalog_for(settings)
        if prepare:  # not under --dry-run: it may create the data root
            self.catalog.prepare()
        self.backend = open_backend(settings)
        self.databases = open_databases(settings, self.catalog, self.backend)
        self.manager = InstanceManager(settings, self.databases)
        self.ops = Ops(settings, self.catalog, self.databases, self.manager)

    async def __aenter__(self) -> "Offline":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.manager.stop_all()
        await self.backend.close()


def run_offline(ctx: click.Context, body: Callable[[Offline], Any]) -> Any:
    """Run `body(offline)` with clear CLI errors for gateway, storage and operation failures."""
    from storage.errors import StorageError

    from gateway.errors import GatewayError
    from gateway.ops.results import OperationError

    settings = settings_for(ctx)
    setup_logging(command_log_level(ctx))

    async def main():
        async with Offline(settings, prepare=not opt(ctx, "dry_run")) as off:
            return await body(off)

    try:
        return asyncio.run(main())
    except OperationError as e:
        raise click.ClickException(str(e)) from None
    except GatewayError as e:
        raise click.ClickException(e.message + (f" ({e.detail})" if e.detail else "")) from None
    except StorageError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. a data root whose parent does not exist
        raise click.ClickException(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")) from None


# --- output -------------------------------------------------------------------------------------
def as_json(ctx: click.Context) -> bool:
    return bool(opt(ctx, "json"))


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str))


def say(ctx: click.Context, text: str) -> None:
    """A human line on stdout (not with --json)."""
    if not as_json(ctx):
        click.echo(printable(text))


def note(ctx: click.Context, text: str) -> None:
    """Secondary information on stderr, dropped with --quiet."""
    if not opt(ctx, "quiet"):
        click.echo(printable(text), err=True)


def show_plan(ctx: click.Context, plan) -> None:
    """A dry run's plan: what would change; nothing changed."""
    if as_json(ctx):
        emit_json(plan.to_dict())
        return
    click.echo(f"dry run: {plan.action} {plan.id} would")
    for change in plan.changes:
        click.echo(printable(f"  - {change}"))
    click.echo("nothing was changed")


def table(ctx: click.Context, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Rows as a rich table on a terminal, else one tab-separated line each (for grep/cut).
    Cells are shown as written (they may hold what a tenant named): control characters
    escaped, and on a terminal no rich markup."""
    cells = [["" if v is None else printable(str(v)) for v in r] for r in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=title, show_header=any(columns))
        for c in columns:
            t.add_column(c)
        for r in cells:
            t.add_row(*(escape(v) for v in r))
        Console().print(t)
        return
    for r in cells:
        click.echo("\t".join(r).rstrip())


@contextlib.contextmanager
def working(ctx: click.Context, text: str) -> Iterator[None]:
    """A spinner on stderr while a slow step runs (terminal only, not with --quiet)."""
    if opt(ctx, "quiet") or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
