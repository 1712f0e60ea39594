"""`pgsni db create ID --from SOURCE`: a new database from an existing PGDATA archive, streamed
from a file, S3 or http(s) into place, with a progress bar on a terminal."""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from typing import Callable, Iterator

import click

from gateway.compute.instances import InstanceManager
from storage.sources import open_source

from .importing import import_archive


def check_sha256(source: str | None, value: str) -> str:
    """The --sha256 value, lowercased: 64 hex digits, and only with --from."""
    if source is None:
        raise click.BadParameter("is only meaningful with --from", param_hint="--sha256")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise click.BadParameter("expected 64 hexadecimal digits (a sha256)", param_hint="--sha256")
    return value.lower()


async def create_from(manager: InstanceManager, db_id: str, password: str, spec: str,
                      sha256: str | None) -> None:
    """Open `spec`, stream it into a new database's PGDATA, then start it, give role postgres
    `password` and read its roles, as for a database made from the template."""
    async with open_source(spec, manager.settings) as source:
        if source.warning:
            click.echo(f"warning: {source.warning}", err=True)

        async def place(db_id: str) -> None:
            with _progress(source.size) as advance:
                await import_archive(manager.catalog, db_id, source, sha256=sha256,
                                     majors=manager.installs.by_major,
                                     max_bytes=manager.settings.max_restore_mb << 20,
                                     max_files=manager.settings.max_restore_files,
                                     on_bytes=advance)

        await manager.create(db_id, password, place=place)


@contextlib.contextmanager
def _progress(total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(nbytes)`: a rich progress bar on stderr if it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    columns = (TextColumn("reading archive"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("archive", total=total)
        yield functools.partial(bar.advance, task)
