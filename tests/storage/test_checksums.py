"""S3 writes carry Content-MD5, so a body damaged on its way to the store is refused there
instead of being stored (and later restored) damaged. moto does not check Content-MD5, so
these tests put tests/support/s3check.py in front of it, which checks it as AWS, MinIO, R2
and Tigris do, and which damages bodies in transit on request."""

from __future__ import annotations

import pytest

from storage.errors import StorageError
from storage.s3 import S3Backend

from ..support.moto import REGION
from ..support.s3check import S3CheckProxy

MiB = 1 << 20
MARK = b"pgsni-payload-"


@pytest.fixture
async def checked(moto_server):
    proxy = S3CheckProxy(moto_server.port)
    bucket = moto_server.create_bucket()
    b = S3Backend(bucket, "pfx", endpoint_url=proxy.url, region=REGION, access_key="AKIATEST",
                  secret_key="secret", part_size=5 * MiB, attempts=2, timeout=10)
    yield proxy, b
    await b.close()
    proxy.close()


async def read_all(b, key: str) -> bytes:
    return b"".join([chunk async for chunk in b.download(key)])


def payload(size: int) -> bytes:
    return (MARK * (size // len(MARK) + 1))[:size]


@pytest.mark.parametrize("size", [64 << 10, 12 * MiB], ids=["single-put", "multipart"])
async def test_a_body_damaged_once_is_refused_then_sent_again(checked, tmp_path, size):
    proxy, b = checked
    path = tmp_path / "archive"
    path.write_bytes(payload(size))
    proxy.corrupt(MARK, times=1)
    info = await b.upload_file("dbs/a/versions/v.tar.zst", path)
    assert info.size == size
    assert await read_all(b, "dbs/a/versions/v.tar.zst") == path.read_bytes()
    writes = [s for s in proxy.seen if s.method in ("PUT", "POST") and s.length]
    assert sum(s.refused for s in writes) == 1  # the damaged attempt never reached moto
    bodies = [s for s in writes if s.method == "PUT"]
    assert bodies and all(s.md5 for s in bodies)  # every data-carrying write has Content-MD5


async def test_a_body_damaged_every_time_is_never_stored(checked, tmp_path):
    proxy, b = checked
    path = tmp_path / "archive"
    path.write_bytes(payload(256 << 10))
    proxy.corrupt(MARK, times=100)
    with pytest.raises(StorageError):
        await b.upload_file("dbs/a/versions/v.tar.zst", path)
    assert await b.head("dbs/a/versions/v.tar.zst") is None


async def test_small_puts_carry_content_md5(checked):
    proxy, b = checked
    proxy.corrupt(MARK, times=1)
    await b.put("dbs/a/current.json", MARK + b'{"version": "v1"}')
    assert (await b.get("dbs/a/current.json"))[0] == MARK + b'{"version": "v1"}'
    puts = [s for s in proxy.seen if s.method == "PUT"]
    assert [s.refused for s in puts] == [True, False] and all(s.md5 for s in puts)
