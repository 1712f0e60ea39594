"""Postgres client programs (pg_dump, pg_restore, psql) run against an instance over its private
unix socket, and `db dump`: a pg_dump of a database written atomically to a file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Iterable

from gateway.compute import dbroles
from gateway.compute.instances import InstanceManager
from storage.atomic import fsync_dir, temp_name
from storage.osuser import clean_env

FORMATS = {"custom": "c", "plain": "p", "tar": "t"}


class ToolError(Exception):
    """A client program failed; the message carries its own error output."""


def tool_env() -> dict[str, str]:
    """The environment for client programs: built from nothing (storage/osuser.clean_env), so
    neither the gateway's secrets nor a PG* variable of the caller (PGHOST, PGSERVICE,
    PGOPTIONS, ...) reach them."""
    return clean_env(PGCONNECT_TIMEOUT="20", PGAPPNAME="pgsni")




async def run_tool(bindir: Path, program: str, args: list[str], *, what: str,
                   stdin: Iterable[bytes] | None = None) -> subprocess.CompletedProcess:
    """Run `<bindir>/<program> args`, fed `stdin` (streamed) if given; ToolError with its
    stderr if it fails. Run as the gateway's own user: it can reach the socket directory (it
    owns it, or is root)."""
    argv = [str(bindir / program), *args]

    def run() -> subprocess.CompletedProcess:
        if stdin is None:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  env=tool_env(), errors="replace")
        read, write = os.pipe()
        failed: list[BaseException] = []
        feeder = threading.Thread(target=_feed, args=(write, stdin, failed), daemon=True)
        try:
            feeder.start()
            proc = subprocess.run(argv, stdin=read, capture_output=True, text=True,
                                  env=tool_env(), errors="replace")
        finally:
            os.close(read)  # a feeder still writing (the program stopped early) ends now
            feeder.join()
        if failed:  # the program saw an end of its input that was none: its work is void
            raise ToolError(f"{what} failed: its input could not be read: {failed[0]}")
        return proc

    try:
        proc = await asyncio.to_thread(run)
    except OSError as e:
        raise ToolError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    if proc.returncode != 0:
        raise ToolError(f"{what} failed: {_errors(proc.stderr) or f'{program} exited with code {proc.returncode}'}")
    return proc


def _feed(fd: int, chunks: Iterable[bytes], failed: list[BaseException], batch: int = 1 << 20) -> None:
    """Write `chunks` to the pipe `fd` in batches of about `batch` bytes, then close it; a
    reader that stopped early (EPIPE) ends the writing. What else fails goes to `failed`."""
    try:
        with contextlib.suppress(BrokenPipeError), open(fd, "wb", buffering=batch) as pipe:
            for chunk in chunks:
                pipe.write(chunk)
    except Exception as e:  # noqa: BLE001 -- the caller raises it
        failed.append(e)


def _errors(stderr: str, limit: int = 12) -> str:
    """The useful part of a client program's error output: its last lines, trimmed."""
    lines = [ln.rstrip() for ln in stderr.strip().splitlines() if ln.strip()]
    if len(lines) > limit:
        lines = [f"... ({len(lines) - limit} earlier lines)"] + lines[-limit:]
    return "\n".join(lines)


async def dump(manager: InstanceManager, db_id: str, out: Path, fmt: str = "custom",
               dbname: str = "postgres", extra: list[str] | None = None) -> int:
    """pg_dump database `dbname` of `db_id` to `out` (custom, plain or tar format). The file appears
    complete or not at all: pg_dump writes a temp file beside it, which is fsynced and renamed.
    Returns its size. The instance is started if needed (restored from storage first)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}")
    out = out.absolute()
    if out.is_dir():
        raise ToolError(f"{out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise ToolError(f"directory {out.parent} does not exist")
    inst = await manager.acquire(db_id)
    tmp = temp_name(out)
    try:
        args = [*dbroles.tool_args(inst.socket_dir, dbname), "-F", FORMATS[fmt], *(extra or []), "-f", str(tmp)]
        bindir = manager.installs.for_pgdata(manager.catalog.pgdata(db_id)).bindir  # its own major's
        await run_tool(bindir, "pg_dump", args, what=f"pg_dump of {db_id}")
        size = await asyncio.to_thread(_publish, tmp, out)
    finally:
        manager.release(inst)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return size


def _publish(tmp: Path, out: Path) -> int:
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # a dump holds the data (and may hold secrets)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return size
