"""Server-side copies inside an S3 bucket, mixed into `S3Backend`: CopyObject up to 5 GiB,
a multipart upload of UploadPartCopy ranges beyond, so the bytes never leave the store. It
uses the backend's own calls (`_call`, `head`, `_complete`, `_abort`, `_error`)."""

from __future__ import annotations

from botocore.exceptions import ClientError

from .backend import ObjectInfo
from .errors import NotFound, StorageError

MAX_SINGLE_COPY = 5 << 30  # S3's limit for one CopyObject
COPY_PART = 512 << 20


class ServerSideCopy:
    async def copy(self, src: str, dst: str) -> ObjectInfo:
        """Server-side (CopyObject; multipart UploadPartCopy beyond 5 GiB)."""
        full_src, full_dst = self._full(src), self._full(dst)
        info = await self.head(src)
        if info is None:
            raise NotFound(f"{src} not found in {self.url}")
        source = {"Bucket": self.bucket, "Key": full_src}
        try:
            if info.size <= MAX_SINGLE_COPY:
                await self._call(lambda c: c.copy_object(Bucket=self.bucket, Key=full_dst, CopySource=source))
            else:
                await self._multipart_copy(source, full_dst, dst, info.size)
        except ClientError as e:
            raise self._error(e, src) from e
        copied = await self.head(dst)
        if copied is None or copied.size != info.size:
            raise StorageError(f"copy of {src} to {dst} in {self.url} did not produce {info.size} bytes")
        return copied

    async def _multipart_copy(self, source: dict, full_dst: str, dst: str, size: int) -> None:
        mpu = await self._call(lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=full_dst))
        upload_id = mpu["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, size, COPY_PART), 1):
                end = min(size, start + COPY_PART) - 1
                resp = await self._call(lambda c, n=number, s=start, e=end: c.upload_part_copy(
                    Bucket=self.bucket, Key=full_dst, UploadId=upload_id, PartNumber=n,
                    CopySource=source, CopySourceRange=f"bytes={s}-{e}"))
                parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            await self._complete(dst, full_dst, upload_id, parts)
        except BaseException:
            await self._abort(full_dst, upload_id)
            raise
