"""Restore and fork to a point, the parts beside the lifecycle: which stored versions a target
LSN may replay from (`bases_for_lsn`), and a copy of a database at a past moment built in a
scratch directory from a stored version plus its stored WAL (`build_at`, for `db fork --time`
and `--lsn`; the lifecycle stores it as the new database's first version).

Which version an LSN needs. A version's own checkpoint is in its archive only, but the WAL
stored after it (storage/wal.py) begins with the segment holding that checkpoint (the
shipper's slot reserves WAL from there), so a version whose stored WAL begins after L cannot
hold L. Of the others the newest is tried first; if L lies before its checkpoint
(walrestore.BeforeBase, found once its copy is down), the next older one whose stored WAL
goes past L: the run that saved the newer one, or an earlier history that a roll-back left.
An online base backup has no WAL of its own: what it replays is under the prefix of the
version its running copy came from (storage/snapshots.py), from its start on, and it reaches
L from its end (its first consistent point) on; retention keeps that WAL even once that
version is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard

from gateway.config import Settings
from storage import roles as roles_mod
from storage.atomic import remove_tree
from storage.backend import Backend
from storage.errors import NotFound, disk_full_as
from storage.snapshots import Manifest, SnapshotStore
from storage.wal import DEFAULT_SEGMENT_SIZE, StoredWal, WalStore, format_lsn, parse_lsn

from . import durability, pgcontrol
from .postgres import PostgresProcess
from .running import Launcher
from .walrestore import OutOfReach

# XLogLongPageHeaderData, which begins every WAL segment, holds xlp_seg_size at this offset
_SEG_SIZE = struct.Struct("=I")
_SEG_SIZE_AT = 32


@dataclass(frozen=True)
class Reach:
    """The WAL storage holds after one version: from `start` (the beginning of its first
    segment, at or before the version's own checkpoint) up to `end`."""
    version: str
    start: int
    end: int


_FEED = 64  # bytes of compressed WAL inflated at once (at most 16 blocks: 2 MiB) for a header


async def segment_size(backend: Backend, key: str) -> int:
    """The WAL segment size of stored WAL object `key`, from the page header it begins with
    (only its first bytes are read); the default if that header does not say."""
    inflate, head, need = zstandard.ZstdDecompressor().decompressobj(), b"", _SEG_SIZE_AT + _SEG_SIZE.size
    async with contextlib.aclosing(backend.download(key)) as chunks:
        async for chunk in chunks:
            # fed a little at a time: a few bytes of zstd may stand for megabytes (RLE blocks),
            # and only the first bytes are wanted
            for at in range(0, len(chunk), _FEED):
                head += inflate.decompress(chunk[at:at + _FEED])
                if len(head) >= need:
                    break
            if len(head) >= need:
                break
    if len(head) < need:
        return DEFAULT_SEGMENT_SIZE
    size = _SEG_SIZE.unpack_from(head, _SEG_SIZE_AT)[0]
    return size if 1 << 20 <= size <= 1 << 30 and size & (size - 1) == 0 else DEFAULT_SEGMENT_SIZE


def _reach(version: str, stored: StoredWal) -> Reach | None:
    ids = sorted(set(stored.segments) | set(stored.partials))
    if not ids:
        return None
    first = ids[0][0]  # the version's own timeline: later ones branch off it
    start = min(segno for tli, segno in ids if tli == first) * stored.segment_size
    return Reach(version, start, stored.newest()[1])


async def _base_backup_reach(snapshots: SnapshotStore, db_id: str, version: str) -> Reach | None:
    """The reach of `version` if it is an online base backup whose WAL, under the prefix it
    continues, begins at or before its start: from its end (a replay cannot stop before) up
    to the end of that WAL. None for anything else."""
    try:
        base = (await snapshots.manifest(db_id, version)).base_backup
    except NotFound:  # removed meanwhile
        return None
    if not base:
        return None
    size = int(base["segment_size"])
    stored = await WalStore(snapshots.backend, db_id, segment_size=size, base=base["wal"]).listing()
    ids = sorted(set(stored.segments) | set(stored.partials))
    newest = stored.newest()
    if newest is None or min(segno for _, segno in ids) > parse_lsn(base["start_lsn"]) // size:
        return None
    return Reach(version, parse_lsn(base["end_lsn"]), newest[1])


async def bases_for_lsn(snapshots: SnapshotStore, db_id: str, lsn: int, *,
                        growing: bool = False) -> list[Manifest]:
    """The stored versions a restore to `lsn` may replay from, in the order to try them (see
    the module doc): the newest whose stored WAL begins at or before `lsn`, then older ones
    whose stored WAL goes past it. OutOfReach if there is none, or if the newest one's stored
    WAL ends at or before `lsn` and is not `growing` (a database running here, whose stop
    ships the rest)."""
    backend, size = snapshots.backend, None
    found: list[Reach] = []
    oldest: Reach | None = None
    for info in sorted(await snapshots.versions(db_id), key=lambda i: i.version, reverse=True):
        store = WalStore(backend, db_id, segment_size=size or DEFAULT_SEGMENT_SIZE, base=info.version)
        stored = await store.listing()
        # a segment, or a piece from a segment's start: both begin with the long page header
        keys = [*stored.segments.values(), *(k for found in stored.partials.values() for start, _, k in found
                                             if start == 0)]
        if size is None and keys:
            key = keys[0]
            try:
                size = await segment_size(backend, key)
            except NotFound:  # a partial its running shipper replaced meanwhile
                size = DEFAULT_SEGMENT_SIZE
            if size != DEFAULT_SEGMENT_SIZE:
                stored = await WalStore(backend, db_id, segment_size=size, base=info.version).listing()
        reach = _reach(info.version, stored)
        if reach is None:  # no WAL of its own: an online base backup's is under another prefix
            reach = await _base_backup_reach(snapshots, db_id, info.version)
        if reach is None:
            continue
        oldest = reach
        if reach.start <= lsn and (not found or reach.end > lsn):
            found.append(reach)
    if not found:
        where = f"the oldest begins at {format_lsn(oldest.start)}" if oldest else "there is none"
        raise OutOfReach(f'{format_lsn(lsn)} is before the WAL storage holds of database "{db_id}" '
                         f"({where}): retention removed it, or the database did not exist yet")
    if not growing and found[0].end <= lsn:
        raise OutOfReach(f'{format_lsn(lsn)} is beyond the WAL storage holds of database "{db_id}" '
                         f"(up to {format_lsn(found[0].end)}, after version {found[0].version})")
    return [await snapshots.manifest(db_id, r.version) for r in found]


async def build_at(launcher: Launcher, snapshots: SnapshotStore, settings: Settings,
                   source: Manifest, build: Path, **target) -> tuple[Path, dict[str, roles_mod.Role]]:
    """In directory `build` (made here, beside the data root): stored version `source` of its
    database, plus that database's WAL stored after it replayed up to `target` (`target_time`
    or `target_lsn`, as durability.replay_copy) and promoted. Returns the stopped copy's
    PGDATA and its roles (the version's). Only storage is read: the source database may run
    meanwhile. The caller removes `build`."""
    catalog = launcher.catalog
    pgdata, key = build / "pgdata", f".fork-{build.name}"
    catalog.run_as.make_dir(build, 0o711)
    with disk_full_as(f"building a copy of {source.db_id} in {build}"):
        await snapshots.restore(source, pgdata)
    await asyncio.to_thread(catalog.run_as.chown_tree, pgdata)
    uids = launcher.uids
    run_as = catalog.run_as if uids is None else await asyncio.to_thread(uids.claim, key, build, pgdata)
    try:
        install = launcher.installs.for_pgdata(pgdata)
        launcher.make_socket_root()
        process = PostgresProcess(install.bindir, pgdata, settings.socket_path / f"fk-{secrets.token_hex(3)}",
                                  build / "postgres.log", run_as, dict(settings.postgres_options))
        control = await asyncio.to_thread(pgcontrol.read, install.bindir, pgdata, run_as)
        try:
            await durability.replay_copy(process, control, source.db_id, snapshots.backend,
                                         build / "wal", source.wal_prefix, settings, **target)
        finally:
            await remove_tree(process.socket_dir)
    finally:
        if uids is not None:
            uids.release(key)
    return pgdata, source.role_map()
