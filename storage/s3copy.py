"""Server-side copies inside an S3 bucket (`S3Backend.copy`): CopyObject up to 5 GiB, a
multipart upload of UploadPartCopy ranges beyond, so the bytes never leave the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from .backend import ObjectInfo
from .errors import NotFound, StorageError

if TYPE_CHECKING:
    from .s3 import S3Backend

MAX_SINGLE_COPY = 5 << 30  # S3's limit for one CopyObject
COPY_PART = 512 << 20


async def copy(b: "S3Backend", src: str, dst: str) -> ObjectInfo:
    full_src, full_dst = b._full(src), b._full(dst)
    info = await b.head(src)
    if info is None:
        raise NotFound(f"{src} not found in {b.url}")
    source = {"Bucket": b.bucket, "Key": full_src}
    try:
        if info.size <= MAX_SINGLE_COPY:
            await b._call(lambda c: c.copy_object(Bucket=b.bucket, Key=full_dst, CopySource=source))
        else:
            await _multipart_copy(b, source, full_dst, dst, info.size)
    except ClientError as e:
        raise b._error(e, src) from e
    copied = await b.head(dst)
    if copied is None or copied.size != info.size:
        raise StorageError(f"copy of {src} to {dst} in {b.url} did not produce {info.size} bytes")
    return copied


async def _multipart_copy(b: "S3Backend", source: dict, full_dst: str, dst: str, size: int) -> None:
    mpu = await b._call(lambda c: c.create_multipart_upload(Bucket=b.bucket, Key=full_dst))
    upload_id = mpu["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, COPY_PART), 1):
            end = min(size, start + COPY_PART) - 1
            resp = await b._call(lambda c, n=number, s=start, e=end: c.upload_part_copy(
                Bucket=b.bucket, Key=full_dst, UploadId=upload_id, PartNumber=n,
                CopySource=source, CopySourceRange=f"bytes={s}-{e}"))
            parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
        await b._complete(dst, full_dst, upload_id, parts)
    except BaseException:
        await b._abort(full_dst, upload_id)
        raise
