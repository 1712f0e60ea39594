"""Build the storage backend and version store the settings ask for."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .backend import Backend
from .snapshots import SnapshotStore

if TYPE_CHECKING:
    from gateway.config import Settings


def open_backend(settings: "Settings") -> Backend:
    kind = settings.storage_kind
    where, prefix = settings.storage_location()
    if kind == "s3":
        from .s3 import S3Backend

        return S3Backend(where, prefix, endpoint_url=settings.s3_endpoint or None,
                         region=settings.s3_region or None, access_key=settings.s3_access_key or None,
                         secret_key=settings.s3_secret_key or None, path_style=settings.s3_path_style,
                         attempts=settings.storage_attempts, timeout=settings.storage_timeout)
    from .localdir import LocalDirBackend

    # local, and s3fs: the bucket mounted as a directory (see storage/s3fs.py for mounting)
    return LocalDirBackend(Path(where).absolute(), prefix)


def snapshot_store(settings: "Settings", backend: Backend | None = None) -> SnapshotStore:
    return SnapshotStore(backend or open_backend(settings), settings.data_path / ".spool",
                         max_restore_bytes=settings.max_restore_mb << 20,
                         keep_last=settings.retention_keep, keep_days=settings.retention_days)
