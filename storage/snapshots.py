"""Versions of a database in storage: each snapshot is an immutable archive plus a manifest,
and a small pointer object names the current version. The pointer moves only after the new
version is fully uploaded and checked, with a conditional write so two writers never
silently overwrite each other.

    dbs/<id>/versions/<version>.tar.zst             tar of the stopped PGDATA, zstd
    dbs/<id>/versions/<version>.json                manifest: roles, Postgres major, time, the
                                                    archive's and each file list part's sha256
    dbs/<id>/versions/<version>.files-<n>.json.zst  file list part: path -> size, sha256
    dbs/<id>/current.json                           {"version": ...}

The manifest is read at every login that needs stored roles, so it stays small: the file list,
needed only to restore, is in parts (storage/filelist.py). Manifests of format 1 (file list
inline) are still read.

A version is a snapshot of a stopped copy, or an online base backup of a running one (format 3,
`base_backup`): that one needs the WAL written while it was taken, which lives under the prefix
of the version its copy descended from (`Manifest.wal_prefix`, storage/wal.py), and retention
keeps that WAL while such a base backup is kept.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import archive, filelist
from .backend import Backend
from .errors import CorruptArchive, LeaseLost, NotFound, PreconditionFailed, StorageError, disk_full_as
from .ids import valid_version
from .roles import Role
from .streams import feed_thread
from .wal import WalStore, parse_lsn

log = logging.getLogger("pgsni.snapshots")
FORMAT = 2
BASE_FORMAT = 3  # a base backup's manifest: a reader that does not know them refuses it plainly


def version_time(version: str) -> dt.datetime | None:
    """When a version was made, from its name (None for a name not made by `new_version`)."""
    try:
        return dt.datetime.strptime(version[:19], "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def new_version() -> str:
    """Sortable by time, unique across writers: 20261122T184901.123Z-3f9a1c."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


@dataclass
class Manifest:
    db_id: str
    version: str
    created: str
    pg_major: str
    roles: dict[str, dict]
    archive: dict  # {"key", "size", "sha256", "compression"}
    # {"count": files, "parts": [{"key", "size", "sha256", "count"}, ...]}; read from a manifest
    # of format 1, {"count": files, "inline": {path: {"size", "sha256"}}}
    file_list: dict
    parent: str | None = None
    note: str = ""
    format: int = FORMAT
    # an online base backup of a running copy (gateway/compute/basebackup.py): {"wal": the version
    # whose WAL prefix holds the WAL it needs, "timeline", "start_lsn", "end_lsn",
    # "checkpoint_lsn" (text LSNs), "segment_size"}; None for a snapshot of a stopped copy
    base_backup: dict | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            raw = json.loads(data)
            if raw.get("format") == 1:
                raw["file_list"] = {"count": len(raw["files"]), "inline": raw.pop("files")}
            elif raw.get("format") not in (FORMAT, BASE_FORMAT):
                raise StorageError(f"manifest format {raw.get('format')!r} is not supported")
            manifest = cls(**raw)
            if not isinstance(manifest.file_list["count"], int):
                raise TypeError("the file count is not a number")
            if (manifest.format == BASE_FORMAT) != isinstance(manifest.base_backup, dict) or (
                    manifest.base_backup and not isinstance(manifest.base_backup["wal"], str)):
                raise TypeError("a base backup's manifest is format 3 and names its WAL")
            # both become key parts and local directory names (the WAL spool): no path in them
            if not valid_version(manifest.version) or not valid_version(manifest.wal_prefix):
                raise ValueError(f"version {manifest.version!r} or WAL prefix {manifest.wal_prefix!r} "
                                 f"is not a version")
            return manifest
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise CorruptArchive(f"manifest is not valid: {e!r}") from None

    @property
    def file_count(self) -> int:
        return self.file_list["count"]

    def role_map(self) -> dict[str, Role]:
        return {name: Role(**r) for name, r in self.roles.items()}

    @property
    def wal_prefix(self) -> str:
        """The version under whose prefix the WAL replayed onto this one lives (storage/wal.py):
        its own, or for a base backup the one its running copy descended from."""
        return self.base_backup["wal"] if self.base_backup else self.version


@dataclass
class VersionInfo:
    version: str
    size: int
    current: bool = False


@dataclass
class Current:
    manifest: Manifest
    etag: str


@dataclass
class _Keys:
    db_id: str
    base: str = field(init=False)

    def __post_init__(self) -> None:
        self.base = f"dbs/{self.db_id}/"

    @property
    def pointer(self) -> str:
        return self.base + "current.json"

    def archive(self, version: str) -> str:
        return f"{self.base}versions/{version}.tar.zst"

    def manifest(self, version: str) -> str:
        return f"{self.base}versions/{version}.json"

    def part(self, version: str, n: int) -> str:
        return f"{self.base}versions/{version}.files-{n:04d}.json.zst"

    def of_version(self, version: str) -> str:
        """The prefix of every object of `version` (no other version's keys start with it)."""
        return f"{self.base}versions/{version}."


class SnapshotStore:
    def __init__(self, backend: Backend, spool_dir: Path, *, max_restore_bytes: int = 64 << 30,
                 max_restore_files: int = 1_000_000, keep_last: int = 10,
                 keep_days: float = 0.0) -> None:
        self.backend = backend
        self.spool_dir = spool_dir
        self.max_restore_bytes = max_restore_bytes
        self.max_restore_files = max_restore_files
        self.keep_last = keep_last
        self.keep_days = keep_days
        # called as on_transfer("save" | "restore", archive bytes, seconds) after each success
        self.on_transfer: Callable[[str, int, float], None] | None = None
        # whether this gateway may still change a database in storage (it holds its lease:
        # storage/leases.py `holds`); asked right before the pointer of a stored database moves
        # and before a database is deleted, however long the work before took
        self.may_change: Callable[[str], bool] | None = None

    # --- reading ----------------------------------------------------------------------------
    async def current(self, db_id: str) -> Current | None:
        """The current version's manifest and the pointer's etag, or None if the database is
        not in storage."""
        keys = _Keys(db_id)
        try:
            data, etag = await self.backend.get(keys.pointer)
        except NotFound:
            return None
        try:
            version = json.loads(data)["version"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise CorruptArchive(f"pointer {keys.pointer} is not valid") from None
        if not valid_version(version):
            raise CorruptArchive(f"pointer {keys.pointer} names no version: {str(version)[:80]!r}")
        return Current(await self.manifest(db_id, version), etag)

    async def manifest(self, db_id: str, version: str) -> Manifest:
        data, _ = await self.backend.get(_Keys(db_id).manifest(version))
        m = Manifest.from_json(data)
        if m.db_id != db_id or m.version != version:
            raise CorruptArchive(f"manifest of {db_id}/{version} names {m.db_id}/{m.version}")
        return m

    async def file_entries(self, manifest: Manifest) -> dict[str, archive.FileEntry]:
        """Every file of a version with its size and sha256, read from the file list's parts
        (or, format 1, the manifest itself). Refuses more than `max_restore_files`."""
        name = f"{manifest.db_id}/{manifest.version}"
        try:
            listing = manifest.file_list
            if listing["count"] > self.max_restore_files:
                raise StorageError(
                    f"version {name} has {listing['count']} files, more than max_restore_files "
                    f"({self.max_restore_files}); raise that setting to restore it")
            if "inline" in listing:
                return {p: archive.FileEntry(e["size"], e["sha256"])
                        for p, e in listing["inline"].items()}
            files: dict[str, archive.FileEntry] = {}
            for ref in listing["parts"]:
                if not 0 < ref["count"] <= listing["count"] - len(files):
                    break  # more files than the manifest names: refused below, read no further
                try:
                    data, _ = await self.backend.get(ref["key"])
                except NotFound:  # not "no such database": the version is damaged
                    raise CorruptArchive(f"file list part {ref['key']} of {name} is missing") from None
                files.update(filelist.decode(data, ref))
        except (KeyError, TypeError, AttributeError) as e:
            raise CorruptArchive(f"manifest of {name} has an invalid file list: {e!r}") from None
        if len(files) != listing["count"]:
            raise CorruptArchive(f"file list of {name} does not add up to the {listing['count']} "
                                 f"files its manifest names")
        return files

    async def versions(self, db_id: str) -> list[VersionInfo]:
        keys = _Keys(db_id)
        cur = await self.current(db_id)
        out = []
        for obj in await self.backend.list(keys.base + "versions/"):
            if obj.key.endswith(".tar.zst"):
                v = obj.key.rsplit("/", 1)[1][: -len(".tar.zst")]
                out.append(VersionInfo(v, obj.size, current=cur is not None and cur.manifest.version == v))
        return out

    async def list_databases(self) -> list[str]:
        return sorted({o.key.split("/")[1] for o in await self.backend.list("dbs/")
                       if o.key.endswith("/current.json")})

    # --- writing ----------------------------------------------------------------------------
    async def snapshot(self, db_id: str, pgdata: Path, roles: dict[str, Role], *,
                       expect: Current | None | bool = True, note: str = "",
                       base_backup: dict | None = None, make_current: bool = True) -> Manifest:
        """Archive a stopped PGDATA (or a base backup: `base_backup` as in Manifest) as a new
        version and make it current (unless not `make_current`: then the caller moves the
        pointer with `set_current`, and retention runs then).

        `expect`: the Current read earlier (the pointer must still be at its etag), None (the
        database must not be in storage yet), or True (read the pointer now)."""
        keys = _Keys(db_id)
        began = time.monotonic()
        if expect is True:
            expect = await self.current(db_id)
        version = new_version()
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        spool = self.spool_dir / f"{db_id}-{version}.tar.zst"
        try:
            with disk_full_as(f"the snapshot of {db_id} (spooled in {self.spool_dir})"):
                info = await asyncio.to_thread(_create_spool, pgdata, spool)
            if expect is not None:  # archiving took a while: no upload that could not be made current
                self._check_held(db_id, "uploaded a new version (nothing was uploaded)")
            uploaded = await self.backend.upload_file(keys.archive(version), spool)
            if uploaded.size != info.size:
                raise StorageError(f"upload of {keys.archive(version)} is {uploaded.size} bytes, "
                                   f"expected {info.size}")
        finally:
            spool.unlink(missing_ok=True)
        manifest = Manifest(
            db_id=db_id, version=version, created=dt.datetime.now(dt.timezone.utc).isoformat(),
            pg_major=(pgdata / "PG_VERSION").read_text().strip(),
            roles={n: asdict(r) for n, r in roles.items()},
            archive={"key": keys.archive(version), "size": info.size, "sha256": info.sha256,
                     "compression": "zstd"},
            file_list=await self.put_file_list(db_id, version, info.files),
            parent=expect.manifest.version if isinstance(expect, Current) else None, note=note,
            base_backup=base_backup, format=BASE_FORMAT if base_backup else FORMAT)
        await self.backend.put(keys.manifest(version), manifest.to_json(), if_none_match=True)
        log.info("%s %s/%s: %d files, %d bytes", "base backup" if base_backup else "snapshot",
                 db_id, version, len(info.files), info.size)
        self._transferred("save", info.size, began)
        if make_current:
            await self._point(db_id, version, expect if isinstance(expect, Current) else None)
            await self.prune(db_id)
        return manifest

    async def put_file_list(self, db_id: str, version: str,
                            files: dict[str, archive.FileEntry]) -> dict:
        """Store the file list of a new version in parts; return the manifest's `file_list`."""
        parts = await asyncio.to_thread(filelist.encode, files)
        refs = []
        for n, (data, count) in enumerate(parts):
            key = _Keys(db_id).part(version, n)
            await self.backend.put(key, data, if_none_match=True)
            refs.append({"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "count": count})
        return {"count": len(files), "parts": refs}

    async def set_current(self, db_id: str, version: str, expect: Current | None) -> Manifest:
        """Point at an existing version (a rollback); the manifest must exist."""
        manifest = await self.manifest(db_id, version)
        await self._point(db_id, version, expect)
        return manifest

    def _check_held(self, db_id: str, doing: str) -> None:
        if self.may_change is not None and not self.may_change(db_id):
            raise LeaseLost(f"this gateway's lease on database {db_id} lapsed (storage unreachable "
                            f"for too long) before it {doing}; another gateway may have taken "
                            f"the database over. Try again")

    async def _point(self, db_id: str, version: str, expect: Current | None) -> None:
        data = json.dumps({"version": version}).encode()
        if expect is not None:  # a new database's first pointer is written only if absent
            self._check_held(db_id, f"made version {version} current (the version is kept)")
        try:
            if expect is None:
                await self.backend.put(_Keys(db_id).pointer, data, if_none_match=True)
            else:
                await self.backend.put(_Keys(db_id).pointer, data, if_match=expect.etag)
        except PreconditionFailed:
            raise PreconditionFailed(
                f"database {db_id} was changed in storage by another writer while this one was "
                f"snapshotting; version {version} was kept but not made current") from None

    async def prune(self, db_id: str) -> list[str]:
        """Apply retention: keep the newest `keep_last` versions and those younger than
        `keep_days` (when set); never the current one. Returns the versions removed."""
        infos = await self.versions(db_id)
        newest_first = sorted(infos, key=lambda i: i.version, reverse=True)
        cutoff = None
        if self.keep_days > 0:
            cutoff = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=self.keep_days)).strftime("%Y%m%dT%H%M%S")
        doomed = []
        for index, info in enumerate(newest_first):
            young = cutoff is not None and info.version >= cutoff
            if info.current or index < self.keep_last or young:
                continue
            doomed.append(info.version)
        if doomed:
            kept = {i.version for i in infos} - set(doomed)
            wal = await self._wal_left(db_id, doomed, kept)
            for version in doomed:
                await self.delete_version(db_id, version, wal=False)
            for prefix, keep_from in (wal or {}).items():
                await self._drop_wal(db_id, prefix, keep_from)
            log.info("retention removed %d version(s) of %s", len(doomed), db_id)
        return doomed

    async def _wal_left(self, db_id: str, doomed: list[str],
                        kept: set[str]) -> dict[str, tuple[int, int] | None] | None:
        """The WAL prefixes (storage/wal.py) that removing `doomed` leaves unneeded, each with
        where the WAL still needed begins: (the earliest LSN a kept base backup that continues
        it replays from, segment size), or None if nothing of it is. A prefix is needed while
        its version is kept, or in part while a kept base backup continues it. None when a
        manifest cannot be read: then no WAL is removed."""
        touched, continued = set(doomed), {}
        try:
            for version in sorted(kept | set(doomed)):
                base = (await self.manifest(db_id, version)).base_backup
                if base and version in kept:
                    start = (parse_lsn(base["start_lsn"]), int(base["segment_size"]))
                    continued[base["wal"]] = min(continued.get(base["wal"], start), start)
                elif base:
                    touched.add(base["wal"])
        except StorageError as e:
            log.warning("retention keeps the WAL of %s: a manifest cannot be read: %s", db_id, e)
            return None
        return {prefix: continued.get(prefix) for prefix in touched - kept}

    async def _drop_wal(self, db_id: str, prefix: str, keep_from: tuple[int, int] | None) -> None:
        """Remove the WAL under `prefix`: all of it, or what ends before `keep_from`."""
        if keep_from is None:
            objs = await self.backend.list(WalStore(self.backend, db_id, base=prefix).prefix)
            await self.backend.delete([o.key for o in objs])
        else:
            start, segment_size = keep_from
            await WalStore(self.backend, db_id, segment_size=segment_size, base=prefix).remove_before(start)

    async def delete_version(self, db_id: str, version: str, *, wal: bool = True) -> None:
        """Remove a version's objects (archive, manifest, file list) and, unless not `wal`,
        the WAL written after it (storage/wal.py: replayed only onto that version; retention
        decides with `_wal_left`). Never the pointer."""
        objs = await self.backend.list(_Keys(db_id).of_version(version))
        if wal:
            objs += await self.backend.list(WalStore(self.backend, db_id, base=version).prefix)
        await self.backend.delete([o.key for o in objs])

    async def delete_database(self, db_id: str) -> None:
        self._check_held(db_id, "deleted the database from storage (nothing was deleted there)")
        keys = _Keys(db_id)
        await self.backend.delete([o.key for o in await self.backend.list(keys.base)])

    # --- restoring ----------------------------------------------------------------------------
    async def restore(self, manifest: Manifest, target: Path) -> None:
        """Download a version straight into extraction (no temporary archive), checking the
        archive's sha256 and every file against the manifest. `target` must not exist; on
        failure the caller removes it."""
        expected_archive = manifest.archive
        expected_files = await self.file_entries(manifest)
        digest = hashlib.sha256()
        received = 0
        began = time.monotonic()

        def seen(chunk: bytes) -> None:
            nonlocal received
            digest.update(chunk)
            received += len(chunk)

        def consume(reader) -> None:
            archive.extract(reader, target, compression="zstd", max_bytes=self.max_restore_bytes,
                            max_files=self.max_restore_files, expected=expected_files)
            archive.refuse_tablespaces(target)  # a tampered store: its links would lead out

        await feed_thread(self.backend.download(expected_archive["key"]), consume, on_chunk=seen)
        if received != expected_archive["size"] or digest.hexdigest() != expected_archive["sha256"]:
            raise CorruptArchive(
                f"snapshot {manifest.db_id}/{manifest.version} does not match its manifest "
                f"(got {received} bytes, sha256 {digest.hexdigest()[:12]}...)")
        self._transferred("restore", received, began)

    def _transferred(self, operation: str, size: int, began: float) -> None:
        if self.on_transfer is not None:
            self.on_transfer(operation, size, time.monotonic() - began)


def _create_spool(pgdata: Path, spool: Path) -> archive.ArchiveInfo:
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        info = archive.create(pgdata, out)
        out.flush()
        os.fsync(out.fileno())
    return info
