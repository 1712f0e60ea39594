"""A `Backend` on the S3 API (AWS, MinIO, Ceph, R2, moto, ...) using aioboto3.

Retries
  Our loop is the only retry layer: botocore is configured for a single attempt with short
  connect/read timeouts. A call is tried up to `attempts` times, each attempt bounded by
  `asyncio.timeout(timeout)`, with exponential backoff (0.2 s, 0.4 s, 0.8 s, ... capped at
  5 s) in between. Retried: connection failures and timeouts, 5xx answers, and throttling
  (SlowDown, 429, RequestTimeout). After the last failure the call raises
  StorageUnavailable("storage s3://bucket/prefix is unavailable: <reason>"), so an outage
  surfaces within attempts x timeout + backoff (`retry_budget`). Messages never carry
  credentials. Other 4xx answers raise StorageError with the S3 error code and message.

  Each attempt -- including one part of a multipart upload -- must finish within `timeout`;
  with the default 8 MiB parts and 30 s this needs about 2.2 Mbit/s of upload bandwidth.

Conditional writes
  `put(if_match=etag)` sends If-Match, `put(if_none_match=True)` If-None-Match: *. 412, and
  409 ConditionalRequestConflict (a concurrent conditional write), become
  PreconditionFailed, as does a 404 to If-Match (the object is gone). A retried
  conditional PUT can fail its condition against our own first attempt, whose answer was
  lost; if the object's etag then equals the md5 of our data we report success.

Streams
  `download()` retries only the initial request. A failure mid-stream raises
  StorageUnavailable; the caller restarts the download (objects are immutable snapshots,
  so a restart is always correct).

  `upload_file()` sends files up to `part_size` with one streamed PutObject (the file
  object is handed to aiohttp, which reads it in chunks), and larger files as a multipart
  upload whose parts (`part_size` each, read one at a time) are retried individually. A
  failed multipart upload is aborted so no parts are left behind; if even the abort cannot
  reach the store, the parts stay until the bucket's AbortIncompleteMultipartUpload
  lifecycle rule removes them (configure one).

Checksums
  Every write that carries data (PutObject, UploadPart) sends Content-MD5, so a body damaged
  on its way is refused by the store (400 BadDigest, retried like a transient failure)
  instead of stored: AWS, MinIO, R2 and Tigris check it (moto does not; the tests put a
  checking proxy in front of it). botocore >= 1.36 would add CRC checksums with aws-chunked
  trailers instead, which several S3-compatible stores reject, so those are asked for only
  where the API requires them (`when_required`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from . import backend as backend_mod
from .backend import Backend, ObjectInfo
from .errors import NotFound, PreconditionFailed, StorageError, StorageUnavailable
from .keys import normalize_root_prefix, validate_key, validate_prefix
from .s3copy import ServerSideCopy

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK = 1 << 20
MIN_PART = 5 << 20  # S3's minimum part size (except the last part)
MAX_PARTS = 10_000
DELETE_BATCH = 1000
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0

# Exceptions that mean "could not talk to the store": retried.
TRANSIENT = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    IncompleteReadError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,  # the builtin: ConnectionResetError etc.
)
RETRY_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
               "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
               "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded",
               "BadDigest"}  # the body arrived damaged (Content-MD5): sending it again may work
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


def retry_budget(attempts: int, timeout: float) -> float:
    """The longest one call may take before it gives up: every attempt, and the backoff
    between them (4 attempts of 10 s: 41.4 s)."""
    backoff = sum(min(BACKOFF_FIRST * 2 ** i, BACKOFF_MAX) for i in range(attempts - 1))
    return attempts * timeout + backoff


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or _status(e) or "Unknown")


def _retryable(e: ClientError) -> bool:
    status = _status(e)
    return status >= 500 or status == 429 or _code(e) in RETRY_CODES


def _is_not_found(e: ClientError) -> bool:
    # NoSuchBucket is a 404 too, but a missing bucket is a configuration error, not an absent
    # object: it must never make a database look like it does not exist.
    return _code(e) in NOT_FOUND_CODES or (_status(e) == 404 and _code(e) != "NoSuchBucket")


def _is_precondition(e: ClientError) -> bool:
    return _status(e) == 412 or _code(e) in ("PreconditionFailed", "ConditionalRequestConflict")


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def content_md5(data: bytes) -> str:
    """The Content-MD5 header of a body: base64 of its md5 digest."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def _multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives a completed multipart upload: md5 of the parts' md5s, '-N'."""
    digests = b"".join(binascii.unhexlify(e.strip('"')) for e in part_etags)
    return f"{hashlib.md5(digests).hexdigest()}-{len(part_etags)}"


class S3Backend(ServerSideCopy, Backend):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, path_style: bool = True,
                 part_size: int = 8 << 20, attempts: int = 4, timeout: float = 30.0) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (the S3 minimum)")
        if attempts < 1 or timeout <= 0:
            raise ValueError("attempts must be >= 1 and timeout > 0")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.bucket = bucket
        self.prefix = normalize_root_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self.path_style = path_style
        self.part_size = part_size
        self.attempts = attempts
        self.timeout = timeout
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()

    def __repr__(self) -> str:  # never show the keys
        return f"S3Backend({self.describe()})"

    # --- naming -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def describe(self) -> str:
        endpoint = _strip_userinfo(self.endpoint_url) if self.endpoint_url else "AWS default"
        return f"{self.url} (endpoint {endpoint})"

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str | None:
        if not self.prefix:
            return full
        head = self.prefix + "/"
        return full[len(head):] if full.startswith(head) else None

    def _redact(self, text: str) -> str:
        for secret in (self._secret_key, self._access_key):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _reason(self, e: BaseException) -> str:
        if isinstance(e, ClientError):
            msg = e.response.get("Error", {}).get("Message") or ""
            reason = f"{_code(e)} (HTTP {_status(e)}){': ' + msg if msg else ''}"
        elif isinstance(e, asyncio.TimeoutError) and not str(e):
            reason = f"no answer within {self.timeout:g} s"
        else:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        reason = self._redact(reason)
        return reason if len(reason) <= 200 else reason[:197] + "..."

    def _unavailable(self, reason: str) -> StorageUnavailable:
        return StorageUnavailable(f"storage {self.url} is unavailable: {reason}")

    def _error(self, e: ClientError, key: str | None = None) -> StorageError:
        """A non-retryable error answer, as the right StorageError."""
        where = f"{self.url}/{key}" if key else self.url
        if key is not None and _is_not_found(e):
            return NotFound(f"{key} not found in {self.url}")
        if _code(e) == "NoSuchBucket":
            return StorageError(f"storage {self.url}: the bucket does not exist (NoSuchBucket)")
        return StorageError(f"storage {where}: {self._reason(e)}")

    # --- client and retries -----------------------------------------------------------------
    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                config = AioConfig(
                    s3={"addressing_style": "path" if self.path_style else "auto"},
                    retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=min(self.timeout, 5.0),
                    read_timeout=self.timeout,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                kwargs: dict[str, Any] = {"config": config}
                if self.endpoint_url:
                    kwargs["endpoint_url"] = self.endpoint_url
                if self.region:
                    kwargs["region_name"] = self.region
                if self._access_key is not None:
                    kwargs["aws_access_key_id"] = self._access_key
                    kwargs["aws_secret_access_key"] = self._secret_key
                stack = contextlib.AsyncExitStack()
                try:
                    client = await stack.enter_async_context(
                        aioboto3.Session().client("s3", **kwargs))
                except BotoCoreError as e:
                    await stack.aclose()
                    raise StorageError(f"storage {self.url}: cannot set up the S3 client: "
                                       f"{self._reason(e)}") from e
                self._stack, self._client = stack, client
        return self._client

    async def close(self) -> None:
        async with self._client_lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(client)` with our retries. Non-retryable ClientErrors propagate for the
        caller to map; exhausted retries raise StorageUnavailable."""
        delay = BACKOFF_FIRST
        reason = "unknown error"
        for attempt in range(1, self.attempts + 1):
            client = await self._get_client()
            try:
                async with asyncio.timeout(self.timeout):
                    return await fn(client)
            except ClientError as e:
                if not _retryable(e):
                    raise
                reason = self._reason(e)
            except (NoCredentialsError, PartialCredentialsError) as e:
                raise StorageError(f"storage {self.url}: no usable credentials "
                                   f"({type(e).__name__})") from e
            except TRANSIENT as e:
                reason = self._reason(e)
            log.debug("storage %s: attempt %d/%d failed: %s", self.url, attempt, self.attempts, reason)
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        raise self._unavailable(reason)

    # --- reads --------------------------------------------------------------------------------
    async def get(self, key: str) -> tuple[bytes, str]:
        full = self._full(key)

        async def op(c) -> tuple[bytes, str]:
            resp = await c.get_object(Bucket=self.bucket, Key=full)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength") or 0)
                if size > backend_mod.MAX_SMALL_OBJECT:
                    raise StorageError(f"{key} in {self.url} is {size} bytes, too large to read "
                                       f"whole (limit {backend_mod.MAX_SMALL_OBJECT})")
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"].strip('"')

        try:
            return await self._call(op)
        except ClientError as e:
            raise self._error(e, key) from e

    async def head(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            resp = await self._call(lambda c: c.head_object(Bucket=self.bucket, Key=full))
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise self._error(e) from e
        return ObjectInfo(key, int(resp["ContentLength"]), resp["ETag"].strip('"'),
                          resp["LastModified"].timestamp())

    async def list(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = await self._call(lambda c: c.list_objects_v2(**kwargs))
            except ClientError as e:
                raise self._error(e) from e
            for obj in page.get("Contents", []):
                key = self._relative(obj["Key"])
                if key is None:
                    continue
                try:
                    validate_key(key)
                except StorageError:
                    continue  # s3fs directory markers ("dir/"), its temp files, foreign objects
                out.append(ObjectInfo(key, int(obj["Size"]), obj["ETag"].strip('"'),
                                      obj["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                break
        out.sort(key=lambda i: i.key)
        return out

    async def download(self, key: str) -> AsyncIterator[bytes]:
        full = self._full(key)
        try:
            resp = await self._call(lambda c: c.get_object(Bucket=self.bucket, Key=full))
        except ClientError as e:
            raise self._error(e, key) from e
        body = resp["Body"]
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        chunk = await body.read(CHUNK)
                except TRANSIENT as e:
                    raise self._unavailable(f"download of {key} interrupted: {self._reason(e)}") from e
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    # --- writes -------------------------------------------------------------------------------
    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        full = self._full(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": bytes(data),
                                  "ContentMD5": content_md5(data)}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        tries = 0

        async def op(c):
            nonlocal tries
            tries += 1
            return await c.put_object(**kwargs)

        try:
            resp = await self._call(op)
        except ClientError as e:
            lost = (if_match is not None or if_none_match) and _is_precondition(e)
            # S3 answers If-Match on a missing object with 404: the object we expected is gone.
            gone = if_match is not None and _is_not_found(e)
            if not (lost or gone):
                raise self._error(e) from e
            if tries > 1:
                # An earlier attempt may have written the object and lost only its answer;
                # then the retry fails its condition against our own write. S3's etag of a
                # plain PUT is the content's md5 (not with SSE-KMS: then we stay conservative).
                mine = hashlib.md5(kwargs["Body"]).hexdigest()
                info = await self.head(key)
                if info is not None and info.etag == mine:
                    return mine
            if gone:
                raise PreconditionFailed(f"{key} no longer exists in {self.url}") from e
            raise PreconditionFailed(f"{key} in {self.url} changed ({_code(e)})") from e
        return resp["ETag"].strip('"')

    async def upload_file(self, key: str, path: Path, *,
                          progress: Callable[[int], None] | None = None) -> ObjectInfo:
        full = self._full(key)
        path = Path(path)
        try:
            size = (await asyncio.to_thread(os.stat, path)).st_size
        except OSError as e:
            raise StorageError(f"cannot upload {path}: {e.strerror}") from e

        if size <= self.part_size:
            md5 = await asyncio.to_thread(_file_md5, path)

            async def op(c):
                f = await asyncio.to_thread(open, path, "rb")
                try:
                    return await c.put_object(Bucket=self.bucket, Key=full, Body=f,
                                              ContentLength=size, ContentMD5=md5)
                finally:
                    f.close()
            try:
                await self._call(op)
            except ClientError as e:
                raise self._error(e) from e
            if progress is not None:
                progress(size)
        else:
            await self._multipart(key, full, path, size, progress)

        info = await self.head(key)
        if info is None:
            raise StorageError(f"{key} vanished from {self.url} right after its upload")
        return info

    async def _multipart(self, key: str, full: str, path: Path, size: int,
                         progress: Callable[[int], None] | None) -> None:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        try:
            mpu = await self._call(lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=full))
        except ClientError as e:
            raise self._error(e) from e
        upload_id = mpu["UploadId"]
        try:
            f = await asyncio.to_thread(open, path, "rb")
            parts: list[dict] = []
            try:
                number = 1
                while True:
                    data = await asyncio.to_thread(f.read, part_size)
                    if not data:
                        break
                    resp = await self._call(lambda c, n=number, d=data, m=content_md5(data): c.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n, Body=d,
                        ContentMD5=m))
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                    if progress is not None:
                        progress(len(data))
                    number += 1
            finally:
                f.close()
            await self._complete(key, full, upload_id, parts)
        except BaseException as e:
            await self._abort(full, upload_id)
            if isinstance(e, ClientError):
                raise self._error(e) from e
            raise

    async def _complete(self, key: str, full: str, upload_id: str, parts: list[dict]) -> None:
        try:
            await self._call(lambda c: c.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id,
                MultipartUpload={"Parts": parts}))
        except ClientError as e:
            # A retried Complete whose first try succeeded (but whose answer was lost) finds
            # the upload gone: accept it if the object is exactly the one we assembled.
            if _code(e) == "NoSuchUpload":
                info = await self.head(key)
                if info is not None and info.etag == _multipart_etag([p["ETag"] for p in parts]):
                    return
            raise

    async def _abort(self, full: str, upload_id: str) -> None:
        """One bounded try, errors swallowed: we are already failing."""
        try:
            client = await self._get_client()
            async with asyncio.timeout(min(self.timeout, 10.0)):
                await client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as e:  # noqa: BLE001 -- cancellation still propagates
            log.warning("storage %s: could not abort multipart upload of %s (%s); its parts "
                        "remain until a lifecycle rule removes them", self.url, full, self._reason(e))

    async def delete(self, keys: list[str]) -> None:
        full = [self._full(k) for k in keys]  # validate them all before deleting any
        for i in range(0, len(full), DELETE_BATCH):
            batch = [{"Key": k} for k in full[i:i + DELETE_BATCH]]
            try:
                resp = await self._call(lambda c, b=batch: c.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}))
            except ClientError as e:
                raise self._error(e) from e
            errors = [err for err in resp.get("Errors", []) if err.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise StorageError(f"storage {self.url}: could not delete {len(errors)} object(s), "
                                   f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}")
