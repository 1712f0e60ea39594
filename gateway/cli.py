"""`pgsni`: the one console script. Commands only build settings and call into the packages."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
from pathlib import Path

import click

from .config import ConfigError, Settings, load, reference_markdown


def _settings(ctx: click.Context, **overrides) -> Settings:
    try:
        return load(ctx.obj["config"], **overrides)
    except ConfigError as e:
        raise click.ClickException(f"configuration: {e}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="TOML config file (also PGSNI_CONFIG).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.version_option(package_name="pgsni")
@click.pass_context
def main(ctx: click.Context, config: str | None, as_json: bool) -> None:
    """pgsni: a Postgres gateway for many small databases."""
    ctx.obj = {"config": config, "json": as_json}


@main.command()
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5432).")
@click.option("--data-root", help="Directory with one sub-directory per database.")
@click.option("--domain", "domains", multiple=True, help="Domain served as <id>.<domain> (repeatable).")
@click.option("--tls-cert", help="PEM certificate chain.")
@click.option("--tls-key", help="PEM private key.")
@click.option("--create-on-connect", is_flag=True, default=None,
              help="DEVELOPMENT ONLY: create unknown databases on first connect.")
@click.option("--idle-timeout", type=float, help="Seconds before an idle instance is stopped.")
@click.option("--max-instances", type=int, help="Most instances running at once.")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def serve(ctx: click.Context, listen: str | None, domains: tuple[str, ...], **flags) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from certs.context import TLSConfigError

    from .postgres import PostgresError
    from .server import run
    from storage.osuser import OSUserError

    host = port = None
    if listen:
        host, _, port_text = listen.rpartition(":")
        if not host or not port_text.isdigit():
            raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
        host, port = host.strip("[]"), int(port_text)
    settings = _settings(ctx, listen_host=host, listen_port=port,
                         domains=list(domains) or None, **flags)
    _setup_logging(settings.log_level)
    try:
        run(settings)
    except (TLSConfigError, PostgresError, OSUserError, OSError) as e:
        raise click.ClickException(str(e)) from None


@main.group()
def certs() -> None:
    """TLS certificates."""


@certs.command("generate")
@click.option("--domain", "domains", multiple=True, required=True, help="Domain to cover as *.DOMAIN (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write into.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def certs_generate(domains: tuple[str, ...], out: str, force: bool) -> None:
    """Write a development CA and a wildcard certificate (not for production)."""
    from certs.generate import generate, paths

    target = paths(Path(out))
    if target.cert.exists() and not force:
        raise click.ClickException(f"{target.cert} exists; pass --force to replace it")
    made = generate(list(domains), Path(out))
    click.echo(f"CA:          {made.ca}\ncertificate: {made.cert} (*.{', *.'.join(domains)})\nkey:         {made.key}")
    click.echo(f'connect with: psql "host=ID.{domains[0]} hostaddr=127.0.0.1 user=postgres '
               f'sslmode=verify-full sslrootcert={made.ca}"')


@main.group()
def db() -> None:
    """Databases on this gateway's data root."""


def _catalog(settings: Settings):
    from storage.local import LocalCatalog
    from storage.osuser import RunAs

    from .postgres import find_bindir

    return LocalCatalog(settings.data_path, RunAs.resolve(settings.pg_user), find_bindir(settings.pg_bindir))


def _check_id(db_id: str) -> str:
    from storage.ids import valid_id

    if not valid_id(db_id):
        raise click.BadParameter("a database id is 1-63 lowercase letters, digits or inner hyphens",
                                 param_hint="ID")
    return db_id


@db.command("create")
@click.argument("db_id", metavar="ID")
@click.option("--password", envvar="PGSNI_NEW_PASSWORD", help="Password for role postgres (default: generated).")
@click.pass_context
def db_create(ctx: click.Context, db_id: str, password: str | None) -> None:
    """Create database ID; prints the password of role postgres once."""
    from storage.local import StorageError

    from .errors import GatewayError
    from .instances import InstanceManager

    settings = _settings(ctx)
    _check_id(db_id)
    password = password or secrets.token_urlsafe(18)

    async def create() -> None:
        catalog = _catalog(settings)
        catalog.prepare()
        if catalog.exists(db_id):
            raise click.ClickException(f'database "{db_id}" already exists')
        manager = InstanceManager(settings, catalog)
        try:
            await manager.create(db_id, password)
        finally:
            await manager.stop_all()

    _setup_logging("WARNING")
    try:
        asyncio.run(create())
    except (GatewayError, StorageError) as e:
        raise click.ClickException(getattr(e, "message", str(e))) from None
    if ctx.obj["json"]:
        click.echo(json.dumps({"id": db_id, "user": "postgres", "password": password}))
    else:
        click.echo(f'created database "{db_id}"\nuser:     postgres\npassword: {password}\n'
                   "(shown once; store it now)")


@db.command("list")
@click.pass_context
def db_list(ctx: click.Context) -> None:
    """List databases on the data root."""
    ids = _catalog(_settings(ctx)).list()
    if ctx.obj["json"]:
        click.echo(json.dumps(ids))
    else:
        for db_id in ids:
            click.echo(db_id)


@db.command("delete")
@click.argument("db_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def db_delete(ctx: click.Context, db_id: str, yes: bool) -> None:
    """Delete database ID and all its data."""
    from storage.local import StorageError

    catalog = _catalog(_settings(ctx))
    _check_id(db_id)
    if not catalog.exists(db_id):
        raise click.ClickException(f'database "{db_id}" does not exist')
    if not yes:
        click.confirm(f'Delete database "{db_id}" and all its data?', abort=True)
    try:
        catalog.delete(db_id)
    except StorageError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f'deleted database "{db_id}"')


@main.group()
def config() -> None:
    """Configuration."""


@config.command("reference")
def config_reference() -> None:
    """Print the settings reference table (Markdown)."""
    click.echo(reference_markdown(), nl=False)


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective settings."""
    import dataclasses

    click.echo(json.dumps(dataclasses.asdict(_settings(ctx)), indent=2))
