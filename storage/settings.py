"""The settings storage reads (gateway/config.py's Settings has them all), named here so
that storage depends on no other package."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class StorageSettings(Protocol):
    storage_path: str
    s3_bucket: str
    s3_prefix: str
    s3_endpoint: str
    s3_region: str
    s3_access_key: str
    s3_secret_key: str
    s3_path_style: bool
    s3fs_mount: bool
    storage_attempts: int
    storage_timeout: float
    max_restore_mb: int
    max_restore_files: int
    retention_keep: int
    retention_days: float

    @property
    def storage_kind(self) -> str: ...  # local, s3 or s3fs

    @property
    def data_path(self) -> Path: ...

    def storage_location(self) -> tuple[str, str]: ...
