"""`pgsni`: the one console script. Commands only build settings and call into the packages."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from gateway.config import reference_markdown

from .common import Group, settings_for as _settings, setup_logging as _setup_logging


@click.group(cls=Group)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="TOML config file (also PGSNI_CONFIG).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every command).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the essential result.")
@click.option("--dry-run", is_flag=True,
              help="Print what a command would change, and change nothing.")
@click.version_option(package_name="pgsni")
@click.pass_context
def main(ctx: click.Context, config: str | None, as_json: bool, verbose: int, quiet: bool,
         dry_run: bool) -> None:
    """pgsni: a Postgres gateway for many small databases."""
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    ctx.obj = {"config": config, "json": as_json, "verbose": verbose, "quiet": quiet,
               "dry_run": dry_run}


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
@click.option("--workers", type=int,
              help="Gateway processes on this one port (default 1; 0: one per CPU core).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def serve(ctx: click.Context, listen: str | None, domains: tuple[str, ...], **flags) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from certs.context import TLSConfigError

    from gateway.compute.postgres import PostgresError
    from gateway.app import serve as serve_gateway
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
    from gateway.logs import setup as setup_logs

    setup_logs(settings.log_level, settings.log_format)
    try:
        serve_gateway(settings)
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
    if click.get_current_context().find_root().obj.get("dry_run"):
        click.echo(f"dry run: would write {target.ca}, {target.cert} and {target.key}; nothing was changed")
        return
    made = generate(list(domains), Path(out))
    click.echo(f"CA:          {made.ca}\ncertificate: {made.cert} (*.{', *.'.join(domains)})\nkey:         {made.key}")
    click.echo(f'connect with: psql "host=ID.{domains[0]} hostaddr=127.0.0.1 user=postgres '
               f'sslmode=verify-full sslrootcert={made.ca}"')


@certs.command("cluster")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Directory of the cluster CA (made there if absent, else reused) and the certificates.")
@click.option("--name", "names", multiple=True, required=True,
              help="Gateway to issue a certificate for (repeatable): writes NAME.pem and NAME-key.pem.")
@click.option("--days", type=int, default=3650, show_default=True, help="Validity of new certificates.")
@click.option("--force", is_flag=True, help="Replace existing certificates of these names.")
def certs_cluster(out: str, names: tuple[str, ...], days: int, force: bool) -> None:
    """Make the fleet's cluster CA and a certificate for each gateway, for the authenticated
    links between gateways (cluster_ca, cluster_cert, cluster_key; docs/fleet.md)."""
    from certs.cluster import make_cluster
    from certs.context import TLSConfigError

    existing = [f"{out}/{n}.pem" for n in names if (Path(out) / f"{n}.pem").exists()]
    if existing and not force:
        raise click.ClickException(f"{', '.join(existing)} exists; pass --force to replace it")
    if click.get_current_context().find_root().obj.get("dry_run"):
        click.echo(f"dry run: would write certificates for {', '.join(names)} in {out}; nothing was changed")
        return
    try:
        made = make_cluster(Path(out), list(names), days=days)
    except (TLSConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"cluster CA:  {made.ca} (keep {made.ca_key} offline: it admits new gateways)")
    for name, (cert, key) in made.members.items():
        click.echo(f"{name}: cluster_cert={cert} cluster_key={key}")


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
    if ctx.obj.get("dry_run"):
        click.echo(f"dry run: would upload {cert} as tls/cert.pem and {key} as tls/key.pem; "
                   "nothing was changed")
        return
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


# --- databases -----------------------------------------------------------------------------------
# The `db` group and its lifecycle commands live in cli_db.py (helpers in cli_common.py);
# commands defined in other modules are added to it with `db.add_command(...)` at the end of
# cli_db.py (db upload / dump / migrate from cli_data.py).
from .db import db  # noqa: E402

main.add_command(db)


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
    from gateway.config import redacted

    click.echo(json.dumps(redacted(_settings(ctx)), indent=2))
