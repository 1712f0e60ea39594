"""Build the storage backend and version store the settings ask for."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .backend import Backend
from .settings import StorageSettings
from .snapshots import SnapshotStore



def open_backend(settings: StorageSettings) -> Backend:
    kind = settings.storage_kind
    where, prefix = settings.storage_location()
    if kind == "s3":
        from .s3 import S3Backend

        return S3Backend(where, prefix, endpoint_url=settings.s3_endpoint or None,
                         region=settings.s3_region or None, access_key=settings.s3_access_key or None,
                         secret_key=settings.s3_secret_key or None, path_style=settings.s3_path_style,
                         attempts=settings.storage_attempts, timeout=settings.storage_timeout)
    if kind == "s3fs":
        from .s3fs import MountedDirBackend

        # the bucket mounted as a directory. When we mount it ourselves (s3fs_mount) the mount
        # is `bucket:/prefix`, so the prefix is already applied; an existing mount is taken to
        # be the bucket's root and the prefix is a directory inside it (same keys either way)
        return MountedDirBackend(Path(where).absolute(), "" if settings.s3fs_mount else prefix)
    from .localdir import LocalDirBackend

    return LocalDirBackend(Path(where).absolute(), prefix)


def retry_budget(settings: StorageSettings) -> float:
    """The longest one storage request may take with all its retries before it fails, in
    seconds: S3 as `s3.retry_budget` computes it; s3fs, which retries on its own, at least
    storage_attempts x storage_timeout; a local directory retries nothing (0)."""
    if settings.storage_kind == "s3":
        from .s3 import retry_budget as s3_budget

        return s3_budget(settings.storage_attempts, settings.storage_timeout)
    if settings.storage_kind == "s3fs":
        return settings.storage_attempts * settings.storage_timeout
    return 0.0


def attach_storage(settings: StorageSettings) -> Callable[[], None] | None:
    """At gateway start, before any storage access: storage=s3fs mounts the bucket (if
    s3fs_mount) or refuses to go on unless it is mounted. Returns the cleanup for shutdown
    (the unmount), or None. Blocking: call it in a thread."""
    if settings.storage_kind != "s3fs":
        return None
    from .s3fs import attach

    return attach(settings)


def snapshot_store(settings: StorageSettings, backend: Backend | None = None) -> SnapshotStore:
    return SnapshotStore(backend or open_backend(settings), settings.data_path / ".spool",
                         max_restore_bytes=settings.max_restore_mb << 20,
                         max_restore_files=settings.max_restore_files,
                         keep_last=settings.retention_keep, keep_days=settings.retention_days)
