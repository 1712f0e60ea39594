"""The storage interface: a small object store (keys -> bytes) with conditional writes and
streamed transfers. Implementations: a local directory (`localdir.py`, also used for a bucket
mounted with s3fs-fuse) and the S3 API (`s3.py`)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

# Small objects (pointers, manifests) are read whole; anything larger must be streamed.
MAX_SMALL_OBJECT = 16 << 20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float  # unix time of the last write, by the store's clock: S3's Last-Modified
    # (whole seconds), a file's mtime in a directory (on s3fs: the writing machine's clock)


class Backend(abc.ABC):
    """Keys are '/'-separated relative names such as `dbs/abc/current.json`; a backend adds
    its own prefix. Every method retries transient failures with backoff, within the
    backend's configured attempts and timeout, then raises StorageUnavailable."""

    @abc.abstractmethod
    async def get(self, key: str) -> tuple[bytes, str]:
        """(data, etag) of a small object; NotFound if absent."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        """Write a small object; return its etag. `if_match=etag`: only if unchanged since;
        `if_none_match=True`: only if absent. A lost condition raises PreconditionFailed."""

    @abc.abstractmethod
    async def upload_file(self, key: str, path: Path, *,
                          progress: Callable[[int], None] | None = None) -> ObjectInfo:
        """Upload a file, streamed (multipart above the part size), never whole in memory.
        The object appears only when complete. `progress(n)` is called with bytes sent."""

    @abc.abstractmethod
    def download(self, key: str) -> AsyncIterator[bytes]:
        """Stream an object's bytes in chunks; NotFound if absent."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Size, etag and modification time, or None if absent."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""

    @abc.abstractmethod
    async def delete(self, keys: list[str]) -> None:
        """Delete objects; absent keys are not an error."""

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        """Copy object `src` to `dst` inside this store, without the bytes passing through
        here where the store can avoid it (a link or file copy locally, server-side on S3).
        NotFound if `src` is absent. This fallback streams through a temp file."""
        import os
        import tempfile

        fd, name = tempfile.mkstemp(prefix=".pgsni-copy-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in self.download(src):
                    out.write(chunk)
            return await self.upload_file(dst, Path(name))
        finally:
            os.unlink(name)

    async def close(self) -> None:
        """Release connections."""

    def describe(self) -> str:
        """Where this backend stores things, for logs and errors (no secrets)."""
        return type(self).__name__
