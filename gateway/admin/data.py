"""The admin API's routes for what is inside a database: a pg_dump download and schema
migrations, over pgtools.dump and migrations.migrate on the running gateway's own instances
(the database is started, or restored from storage, if need be, like a client would)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.ops import migrations
from gateway.ops.operations import Ops, translated
from gateway.ops.pgtools import FORMATS, ToolError
from gateway.ops.pgtools import dump as run_dump
from gateway.ops.results import OperationError
from gateway.ops.sqlfiles import SqlFileError

from .view import GatewayView

log = logging.getLogger("pgsni.admin")

# what a dump is sent as, by pg_dump format
DUMP_TYPES = {"custom": ("application/octet-stream", "dump"), "tar": ("application/x-tar", "tar"),
              "plain": ("application/sql", "sql")}
CHUNK = 1 << 20
# a migration's file name: a plain name, no directories
_SCRIPT = re.compile(r"^[^/\\\0]+\.sql$", re.IGNORECASE)


@contextlib.contextmanager
def _clear_errors(spool: Path):
    """The data tools' errors, and the gateway's and storage's, as OperationError; file
    names are given without the private directory they were spooled in."""
    def text(e: Exception) -> str:
        return str(e).replace(f"{spool}/", "")
    with translated():
        try:
            yield
        except SqlFileError as e:  # a syntax error, or Postgres refused a statement
            raise OperationError("invalid", text(e)) from e
        except migrations.MigrationBusy as e:
            raise OperationError("busy", text(e)) from e
        except migrations.MigrationError as e:
            raise OperationError("invalid", text(e)) from e
        except ToolError as e:
            raise OperationError("failed", text(e)) from e


async def dump(gw: GatewayView, ops: Ops, request: web.Request, db_id: str, fmt: str,
               dbname: str, extra: list[str]) -> web.StreamResponse:
    """pg_dump into a private temporary file first, so that a failure is an error status and
    not a cut download; the file is unlinked before it is sent, so nothing is left behind."""
    if fmt not in FORMATS:
        raise OperationError("invalid", f"format {fmt!r} is not one of {', '.join(DUMP_TYPES)}")
    await ops._require(db_id)
    spool = Path(tempfile.mkdtemp(prefix="pgsni-dump-"))  # 0700, the gateway's own
    try:
        with _clear_errors(spool):
            size = await run_dump(gw.instances, db_id, spool / "dump", fmt, dbname, extra)
        f = open(spool / "dump", "rb")
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    with f:
        kind, suffix = DUMP_TYPES[fmt]
        response = web.StreamResponse(headers={
            "Content-Type": kind, "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{db_id}.{suffix}"'})
        await response.prepare(request)
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client went away; nothing of ours to undo
            log.info("dump of %s: the client went away during the download", db_id)
    return response


async def migrate(gw: GatewayView, ops: Ops, db_id: str, scripts: Any, dbname: str,
                  dry_run: bool) -> dict:
    """Apply the pending ones of `scripts` ({file name: SQL text}, named like the files of
    `pgsni db migrate --dir`), each in its own transaction; the answer mirrors its --json."""
    if not isinstance(scripts, dict) or not scripts:
        raise OperationError("invalid", "field 'migrations' must be an object of "
                             "{\"V<version>__<description>.sql\": \"SQL\"}, not empty")
    for name, text in scripts.items():
        if not _SCRIPT.match(name) or name in (".sql", "..sql"):
            raise OperationError("invalid", f"migration name {name!r} is not a file name ending "
                                 "in .sql", hint="For example V1__create_users.sql.")
        if not isinstance(text, str):
            raise OperationError("invalid", f"migration {name!r} must be a string of SQL")
    await ops._require(db_id)
    with tempfile.TemporaryDirectory(prefix="pgsni-migrate-") as tmp:
        for name, text in scripts.items():
            fd = os.open(Path(tmp) / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "w", encoding="utf-8") as out:
                out.write(text)
        with _clear_errors(Path(tmp)):
            report = await migrations.migrate(gw.instances, db_id, Path(tmp), dbname=dbname,
                                              dry_run=dry_run)
    return report.summary(db_id, dry_run) | {"warnings": report.warnings}
