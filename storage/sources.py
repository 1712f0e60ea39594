"""Open where `pgsni db create --from` reads a PGDATA archive: a local file, s3://bucket/key
or an http(s):// URL, as a stream of byte chunks (never a temporary copy) with its size if known."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, BinaryIO
from urllib.parse import urlsplit

from .errors import StorageError
from .settings import StorageSettings


__all__ = ["Source", "SourceError", "open_source"]

CHUNK = 1 << 20
USAGE = "a file path, s3://bucket/key, https://... or http://..."


class SourceError(StorageError):
    """The archive cannot be read: no such file or object, a refused URL, a failed download."""


@dataclass
class Source:
    name: str  # for messages: no credentials, no query string
    size: int | None  # bytes, when known beforehand
    chunks: AsyncIterator[bytes]
    warning: str = ""


@contextlib.asynccontextmanager
async def open_source(spec: str, settings: StorageSettings) -> AsyncIterator[Source]:
    """Open `spec` for reading; a missing file or object, or an HTTP error answer, fails here,
    before anything is created. Connections are closed when the block ends."""
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in ("", "file"):
        opened = _local(Path(spec[7:] if scheme else spec).expanduser())
    elif scheme == "s3":
        opened = _s3(spec, settings)
    elif scheme in ("http", "https"):
        opened = _http(spec)
    else:
        raise SourceError(f"unsupported source {spec!r}: use {USAGE}")
    async with opened as source:
        yield source


# --- a local file -------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _local(path: Path) -> AsyncIterator[Source]:
    try:
        # O_NONBLOCK: a fifo must not hang the open (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceError(f"{path} is not a regular file")
    with open(fd, "rb") as f:
        yield Source(str(path), st.st_size, _read_file(f))


async def _read_file(f: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(f.read, CHUNK):
        yield chunk


# --- s3://bucket/key ----------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _s3(spec: str, settings: StorageSettings) -> AsyncIterator[Source]:
    from .s3 import S3Backend

    bucket, _, key = spec[5:].partition("/")
    if not bucket or not key:
        raise SourceError(f"{spec!r} is not s3://bucket/key")
    try:
        backend = S3Backend(bucket, "", endpoint_url=settings.s3_endpoint or None,
                            region=settings.s3_region or None,
                            access_key=settings.s3_access_key or None,
                            secret_key=settings.s3_secret_key or None,
                            path_style=settings.s3_path_style,
                            attempts=settings.storage_attempts, timeout=settings.storage_timeout)
    except ValueError as e:
        raise SourceError(f"cannot read {spec}: {e}") from None
    try:
        info = await backend.head(key)
        if info is None:
            raise SourceError(f"{spec}: no such object (or no such bucket)")
        yield Source(spec, info.size, backend.download(key))
    finally:
        await backend.close()


# --- http:// and https:// -----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _http(url: str) -> AsyncIterator[Source]:
    import aiohttp

    name = _public(url)
    warning = (f"{name} is plain http: the archive travels unencrypted and could be read or "
               f"altered on the way (use https://, or check it with --sha256)"
               if url.lower().startswith("http://") else "")
    # the raw bytes, as served: they are what --sha256 describes
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                     trust_env=True) as session:
        try:
            resp = await session.get(url)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise SourceError(f"cannot download {name}: {_reason(e)}") from None
        async with resp:
            if resp.status != 200:
                raise SourceError(f"cannot download {name}: HTTP {resp.status} {resp.reason or ''}".rstrip())
            yield Source(name, resp.content_length, _read_http(resp, name), warning)


async def _read_http(resp, name: str) -> AsyncIterator[bytes]:
    import aiohttp

    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            yield chunk
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise SourceError(f"download of {name} interrupted: {_reason(e)}") from None


def _public(url: str) -> str:
    """The URL without user:password@ and without the query (signed URLs carry secrets)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
