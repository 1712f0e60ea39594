"""A new database from a stored version of another (`pgsni db fork`): the archive is copied
inside storage (a link or file copy locally, server-side on S3; never downloaded), then the
new database's file list, manifest and pointer are written, the pointer only if the id is still
free."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from .errors import StorageError
from .snapshots import FORMAT, Manifest, SnapshotStore, _Keys, new_version


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
        manifest = replace(
            source, db_id=new_id, version=version, parent=None, format=FORMAT,
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
