"""A new database from a stored version of another (`pgsni db fork`): the archive is copied
inside storage (a link or file copy locally, server-side on S3; never downloaded), then the
new database's file list, manifest and pointer are written, the pointer only if the id is still
free. A base backup also takes the WAL written while it was taken (from its start to its end,
no further), under the new version's own WAL prefix."""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from dataclasses import replace
from pathlib import Path

from .backend import Backend
from .errors import StorageError
from .snapshots import BASE_FORMAT, FORMAT, Manifest, SnapshotStore, _Keys, new_version
from .wal import WalStore, parse_lsn, parse_segment_name


async def fork_version(store: SnapshotStore, source: Manifest, new_id: str) -> Manifest:
    """Make `source` (a version of another database) the first version of `new_id`, which
    must not be in storage yet (the pointer is written with If-None-Match)."""
    keys = _Keys(new_id)
    version = new_version()
    files = await store.file_entries(source)  # checked, and rewritten in the current format
    try:
        copied = await store.backend.copy(source.archive["key"], keys.archive(version))
        if copied.size != source.archive["size"]:
            raise StorageError(f"copy of {source.archive['key']} is {copied.size} bytes, "
                               f"expected {source.archive['size']}")
        base = source.base_backup and await _copy_backup_wal(store.backend, source, new_id, version)
        manifest = replace(
            source, db_id=new_id, version=version, parent=None, base_backup=base or None,
            format=BASE_FORMAT if base else FORMAT,
            created=dt.datetime.now(dt.timezone.utc).isoformat(),
            archive={**source.archive, "key": keys.archive(version)},
            file_list=await store.put_file_list(new_id, version, files),
            note=f"forked from {source.db_id} version {source.version}")
        await store.backend.put(keys.manifest(version), manifest.to_json(), if_none_match=True)
        await store._point(new_id, version, None)
    except BaseException:
        # the id was taken meanwhile (or storage failed): remove this version unless the
        # pointer names it after all
        try:
            cur = await store.current(new_id)
            if cur is None or cur.manifest.version != version:
                await store.delete_version(new_id, version)
        except StorageError:
            pass
        raise
    return manifest


async def _copy_backup_wal(backend: Backend, source: Manifest, new_id: str, version: str) -> dict:
    """Copy the WAL base backup `source` needs (from its start to its end) under `version` of
    `new_id`, the segment holding the end cut there; return the new manifest's `base_backup`."""
    base = source.base_backup
    size, timeline = int(base["segment_size"]), int(base["timeline"])
    start, end = parse_lsn(base["start_lsn"]), parse_lsn(base["end_lsn"])
    src = WalStore(backend, source.db_id, segment_size=size, base=base["wal"])
    dst = WalStore(backend, new_id, segment_size=size, base=version)
    with tempfile.TemporaryDirectory(prefix=".pgsni-fork-wal-") as tmp:
        fetched = await src.fetch(Path(tmp), start_lsn=start, timeline=timeline, until_lsn=end - 1)
        for name in fetched.files:
            data = await asyncio.to_thread(Path(tmp, name).read_bytes)
            seg = parse_segment_name(name, size)
            if seg is None:
                if int(name[:8], 16) <= timeline:  # a history file; later ones are not its past
                    await dst.put_history(name, data)
            elif end - seg[1] * size >= size:
                await dst.put_segment(name, data)
            else:
                await dst.put_partial(name, data[:end - seg[1] * size])
    return {**base, "wal": version}
