"""`pgsni`: the one console script. Commands only build settings and call into the packages."""

from __future__ import annotations

import asyncio
import contextlib
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
    from storage.errors import StorageError
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
    except (TLSConfigError, PostgresError, OSUserError, OSError, StorageError) as e:
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


@certs.command("upload")
@click.option("--cert", required=True, type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain.")
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False), help="PEM private key of --cert.")
@click.pass_context
def certs_upload(ctx: click.Context, cert: str, key: str) -> None:
    """Check a certificate and key and upload them to storage as tls/cert.pem and tls/key.pem,
    for tls_from_storage (a running gateway picks them up within tls_reload_seconds)."""
    from certs.context import TLSConfigError
    from certs.reload import upload
    from storage.errors import StorageError
    from storage.factory import open_backend

    settings = _settings(ctx)
    _setup_logging("WARNING")
    backend = open_backend(settings)

    async def main() -> None:
        try:
            await upload(backend, Path(cert), Path(key))
        finally:
            await backend.close()

    try:
        asyncio.run(main())
    except (TLSConfigError, StorageError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"uploaded {cert} as tls/cert.pem and {key} as tls/key.pem to {backend.describe()}")
    if not settings.tls_from_storage:
        click.echo("note: tls_from_storage is off, so the gateway still uses tls_cert and tls_key")


@main.group()
def db() -> None:
    """Databases on this gateway's data root."""


def _catalog(settings: Settings):
    from storage.local import LocalCatalog
    from storage.osuser import RunAs

    from .postgres import find_bindir

    return LocalCatalog(settings.data_path, RunAs.resolve(settings.pg_user), find_bindir(settings.pg_bindir))


class _Offline:
    """The storage and instance machinery without a listening gateway, for one CLI command.
    A database a running gateway has open is refused by its lock."""

    def __init__(self, settings: Settings) -> None:
        from storage.factory import open_backend

        from .instances import InstanceManager
        from .server import open_databases

        self.catalog = _catalog(settings)
        self.catalog.prepare()
        self.backend = open_backend(settings)
        self.databases = open_databases(settings, self.catalog, self.backend)
        self.manager = InstanceManager(settings, self.databases)

    async def __aenter__(self) -> "_Offline":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.manager.stop_all()
        await self.backend.close()


def _run(ctx: click.Context, body) -> object:
    """Run `body(offline)` with clear CLI errors for gateway and storage failures."""
    from storage.errors import StorageError

    from .errors import GatewayError

    settings = _settings(ctx)
    _setup_logging("WARNING")

    async def main():
        async with _Offline(settings) as off:
            return await body(off)

    try:
        return asyncio.run(main())
    except GatewayError as e:
        raise click.ClickException(e.message + (f" ({e.detail})" if e.detail else "")) from None
    except StorageError as e:
        raise click.ClickException(str(e)) from None


def _check_id(db_id: str) -> str:
    from storage.ids import valid_id

    if not valid_id(db_id):
        raise click.BadParameter("a database id is 1-63 lowercase letters, digits or inner hyphens",
                                 param_hint="ID")
    return db_id


@db.command("create")
@click.argument("db_id", metavar="ID")
@click.option("--password", envvar="PGSNI_NEW_PASSWORD", help="Password for role postgres (default: generated).")
@click.option("--from", "source", metavar="SOURCE",
              help="Start from this PGDATA archive (.tar, .tar.gz, .tar.zst): a file path, "
                   "s3://bucket/key or an https:// URL, instead of an empty database.")
@click.option("--sha256", metavar="HEX", help="With --from: the archive's sha256; a mismatch creates nothing.")
@click.pass_context
def db_create(ctx: click.Context, db_id: str, password: str | None, source: str | None,
              sha256: str | None) -> None:
    """Create database ID; prints the password of role postgres once."""
    _check_id(db_id)
    if sha256 is not None:
        from .create_from import check_sha256

        sha256 = check_sha256(source, sha256)
    password = password or secrets.token_urlsafe(18)

    async def create(off: _Offline) -> None:
        if await off.databases.exists(db_id):
            raise click.ClickException(f'database "{db_id}" already exists')
        if source is None:
            await off.manager.create(db_id, password)
        else:
            from .create_from import create_from

            await create_from(off.manager, db_id, password, source, sha256)

    _run(ctx, create)
    if ctx.obj["json"]:
        click.echo(json.dumps({"id": db_id, "user": "postgres", "password": password}))
    else:
        click.echo(f'created database "{db_id}"\nuser:     postgres\npassword: {password}\n'
                   "(shown once; store it now)")


@db.command("list")
@click.pass_context
def db_list(ctx: click.Context) -> None:
    """List databases, on local disk and in storage."""

    async def listing(off: _Offline) -> list[dict]:
        local = set(off.catalog.list())
        stored = set(await off.databases.store.list_databases())
        rows = []
        for db_id in sorted(local | stored):
            state = off.databases.state(db_id) if db_id in local else None
            rows.append({"id": db_id, "local": db_id in local, "stored": db_id in stored,
                         "version": state.version if state else None,
                         "unsaved_changes": bool(state and state.dirty)})
        return rows

    rows = _run(ctx, listing)
    if ctx.obj["json"]:
        click.echo(json.dumps([r["id"] for r in rows]))
        return
    for r in rows:
        where = "+".join(w for w in ("local", "stored") if r[w])
        flag = " (unsaved changes)" if r["unsaved_changes"] else ""
        click.echo(f"{r['id']}\t{where}{flag}")


@db.command("delete")
@click.argument("db_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def db_delete(ctx: click.Context, db_id: str, yes: bool) -> None:
    """Delete database ID: its local copy and every stored version."""
    _check_id(db_id)

    async def exists(off: _Offline) -> bool:
        return await off.databases.exists(db_id)

    if not _run(ctx, exists):
        raise click.ClickException(f'database "{db_id}" does not exist')
    if not yes:
        click.confirm(f'Delete database "{db_id}" and all its versions?', abort=True)

    async def delete(off: _Offline) -> None:
        if off.catalog.db_dir(db_id).exists():
            off.catalog.delete(db_id)  # refused while a gateway has it open
        await off.databases.store.delete_database(db_id)

    _run(ctx, delete)
    click.echo(f'deleted database "{db_id}"')


@db.command("snapshot")
@click.argument("db_id", metavar="ID")
@click.pass_context
def db_snapshot(ctx: click.Context, db_id: str) -> None:
    """Save the local copy of ID to storage as a new version (if it changed)."""
    _check_id(db_id)

    async def snap(off: _Offline):
        if not off.catalog.exists(db_id):
            raise click.ClickException(f'database "{db_id}" has no local copy here')
        with off.catalog.lock(db_id):
            return await off.databases.save(db_id, note="pgsni db snapshot")

    manifest = _run(ctx, snap)
    if manifest is None:
        click.echo("no changes since the stored version; nothing to do")
    else:
        click.echo(f"saved {db_id} as version {manifest.version}")


@db.command("versions")
@click.argument("db_id", metavar="ID")
@click.pass_context
def db_versions(ctx: click.Context, db_id: str) -> None:
    """List the stored versions of ID (newest last)."""
    _check_id(db_id)

    async def versions(off: _Offline):
        return await off.databases.store.versions(db_id)

    infos = _run(ctx, versions)
    if not infos:
        raise click.ClickException(f'database "{db_id}" has no stored versions')
    if ctx.obj["json"]:
        click.echo(json.dumps([{"version": i.version, "size": i.size, "current": i.current} for i in infos]))
        return
    for i in infos:
        click.echo(f"{i.version}\t{i.size:>12}\t{'current' if i.current else ''}".rstrip())


@db.command("restore")
@click.argument("db_id", metavar="ID")
@click.option("--version", "version", required=True, help="Version to make current (see `db versions`).")
@click.pass_context
def db_restore(ctx: click.Context, db_id: str, version: str) -> None:
    """Roll ID back to an earlier version. Unsaved changes become a new version first, so the
    roll-back can itself be undone. The database must not be open in a running gateway."""
    from storage.cache import roll_back

    _check_id(db_id)

    async def restore(off: _Offline):
        with off.catalog.lock(db_id) if off.catalog.exists(db_id) else contextlib.nullcontext():
            return await roll_back(off.databases, db_id, version)

    saved, target = _run(ctx, restore)
    if saved is not None:
        click.echo(f"saved the current state as version {saved.version}")
    click.echo(f"{db_id} is now at version {target.version}")


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
    from .config import redacted

    click.echo(json.dumps(redacted(_settings(ctx)), indent=2))
