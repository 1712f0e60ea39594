"""A new database's PGDATA from a user's archive: the source streams straight into extraction
(its raw bytes hashed on the way), then the tree is made fit for this gateway (same Postgres
major, no stale pid file, our pg_hba.conf, private modes, the Postgres user as owner) before
it appears under the data root in one rename. On any failure nothing is left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Collection

from storage import archive
from storage.errors import CorruptArchive, StorageError, UnsafeArchive, disk_full_as
from storage.local import LocalCatalog
from storage.sources import Source
from storage.streams import feed_thread

STALE = ("postmaster.pid", "postmaster.opts")


async def import_archive(catalog: LocalCatalog, db_id: str, source: Source, *,
                         majors: Collection[str], sha256: str | None = None, max_bytes: int = 64 << 30,
                         max_files: int = 1_000_000,
                         on_bytes: Callable[[int], None] | None = None) -> None:
    """Make `<root>/<id>/pgdata` from the archive `source` (tar, tar.gz or tar.zst, told
    apart by content), which must hold a data directory of one of the Postgres `majors`
    installed here. `sha256`: the hex digest the source's bytes must have."""
    with disk_full_as(f'creating database "{db_id}"'), catalog.staging(db_id) as pgdata:
        try:
            unpacked = pgdata.with_name("archive")
            digest = await _extract(source, unpacked, max_bytes, max_files, on_bytes)
            if sha256 is not None and digest != sha256.lower():
                raise CorruptArchive(f"{source.name} has sha256 {digest}, not the expected {sha256.lower()}")
            await asyncio.to_thread(_adopt, catalog, unpacked, pgdata, majors)
        except BaseException:  # a half-made copy goes in a thread (staging would on the loop)
            await asyncio.to_thread(shutil.rmtree, pgdata.parent, ignore_errors=True)
            raise


async def _extract(source: Source, target: Path, max_bytes: int, max_files: int,
                   on_bytes: Callable[[int], None] | None) -> str:
    """Extract while downloading; return the sha256 of the raw bytes received."""
    digest = hashlib.sha256()

    def seen(chunk: bytes) -> None:
        digest.update(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))

    def consume(reader) -> None:
        archive.extract(reader, target, compression="auto", max_bytes=max_bytes,
                        max_files=max_files)

    await feed_thread(source.chunks, consume, on_chunk=seen)
    return digest.hexdigest()


def _adopt(catalog: LocalCatalog, unpacked: Path, pgdata: Path, majors: Collection[str]) -> None:
    """Move the data directory found in `unpacked` to `pgdata` and make it fit to run here."""
    root = archive.find_pgdata_root(unpacked)
    check_major(root, majors)
    archive.refuse_tablespaces(root)
    os.rename(root, pgdata)
    shutil.rmtree(unpacked, ignore_errors=True)  # whatever else the archive held
    for name in STALE:  # left by a server that was running when the archive was made
        (pgdata / name).unlink(missing_ok=True)
    # pg_hba.conf and pg_ident.conf are the gateway's, rewritten at every start
    if not (pgdata / "postgresql.conf").exists():  # Debian keeps it in /etc/postgresql
        catalog.run_as.write_file(pgdata / "postgresql.conf", "# pgsni: the archive had no postgresql.conf\n")
    _protect(pgdata)
    catalog.run_as.chown_tree(pgdata)


def check_major(pgdata: Path, majors: Collection[str]) -> None:
    """Refuse a data directory of a Postgres major version that is not installed here."""
    with open(pgdata / "PG_VERSION", "rb") as f:
        found = f.read(32).decode("ascii", "replace").strip()
    if not re.fullmatch(r"\d+(\.\d+)?", found):
        raise StorageError(f"archive's PG_VERSION is not a Postgres version: {found[:20]!r}")
    if found not in majors:
        raise StorageError(f"archive is Postgres {found}; this gateway runs "
                           f"{', '.join(sorted(majors, key=int))}")


def _protect(pgdata: Path) -> None:
    """Directories 0700, files 0600, and no symlink leading out of the data directory
    (extraction kept symlinks inside the archive, which may hold more than PGDATA)."""
    for dirpath, dirnames, filenames in os.walk(pgdata):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                _check_symlink(pgdata, path)
            else:
                os.chmod(path, 0o700 if stat.S_ISDIR(mode) else 0o600)
    os.chmod(pgdata, 0o700)


def _check_symlink(pgdata: Path, path: str) -> None:
    rel, link = os.path.relpath(path, pgdata), os.readlink(path)
    reason = archive._symlink_problem(rel, link)
    if reason:
        raise UnsafeArchive(f"archive symlink {rel} -> {link} {reason}: links must stay inside "
                            f"the data directory (tablespaces are not supported)")
