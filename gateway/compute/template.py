"""The template every new database is copied from: initdb with `pgsni_admin` as the bootstrap
superuser, brought to the roles layout by gateway/compute/securing.py (tenant role `postgres` without
SUPERUSER, the agent). storage/local.py calls the maker once per data root and keeps the
result; a template made for an older layout is made again."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import threading
from pathlib import Path

from gateway.config import Settings
from storage.errors import StorageError
from storage.local import LocalCatalog
from storage.osuser import RunAs, clean_env

from . import pgbins
from .dbroles import ADMIN
from .pgbins import PgInstalls, PgNotInstalled
from .securing import SecureError, secure

LAYOUT = "roles-2"  # changes whenever templates made before must be made again (2: admin role settings)


class TemplateMaker:
    """`maker(pgdata, major)` makes a template data directory of that Postgres major at
    `pgdata` (which must not exist)."""

    layout = LAYOUT

    def __init__(self, installs: PgInstalls, run_as: RunAs, socket_root: Path, *,
                 options: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        self.installs, self.run_as, self.socket_root = installs, run_as, socket_root
        self.options, self.timeout = options or {}, timeout

    @property
    def default_major(self) -> str:
        return self.installs.default_major

    def __call__(self, pgdata: Path, major: str) -> None:
        try:
            bindir = self.installs.get(major).bindir
        except PgNotInstalled as e:
            raise StorageError(str(e)) from None
        cmd = [str(bindir / "initdb"), "-D", str(pgdata), "-U", ADMIN, "--auth-local=peer",
               "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"]
        if int(major) >= 18:
            # 18 turns data checksums on by default; with them the first read after a load logs
            # its hint bits as full pages, so a read-only session would store a new version.
            # Every stored file has its sha256 in the manifest instead.
            cmd.append("--no-data-checksums")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(),
                              **self.run_as.popen_kwargs())
        if proc.returncode != 0:
            raise StorageError(f"initdb failed: {proc.stderr.strip() or proc.stdout.strip()}")
        if not self.socket_root.exists():
            self.run_as.make_dir(self.socket_root)
        socket_dir = self.socket_root / f"tpl-{secrets.token_hex(4)}"
        _run_in_own_loop(secure(bindir, pgdata, self.run_as, socket_dir,
                                pgdata.parent / "postgres.log", options=self.options,
                                timeout=self.timeout))


def _run_in_own_loop(coro) -> None:
    """Run `coro` to the end on a fresh event loop in a thread of its own: the maker is called
    from worker threads and from plain code alike, never on a running loop."""
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            failure.append(e)

    thread = threading.Thread(target=main, name="pgsni-template")
    thread.start()
    thread.join()
    if failure:
        if isinstance(failure[0], SecureError):
            raise StorageError(f"making the template failed: {failure[0]}") from failure[0]
        raise failure[0]


def local_catalog(settings: Settings) -> LocalCatalog:
    """The data root of these settings, able to make its templates."""
    run_as = RunAs.resolve(settings.pg_user)
    return LocalCatalog(settings.data_path, run_as, TemplateMaker(
        pgbins.for_settings(settings), run_as, settings.socket_path,
        options=settings.postgres_options, timeout=settings.start_timeout))
