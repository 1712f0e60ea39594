"""`Backend.copy`, the storage operation behind `pgsni db fork`: a local directory links (or
copies) the file, S3 copies server-side (CopyObject, and UploadPartCopy for big objects), and
the generic fallback streams through a temp file."""

from __future__ import annotations

import os

import pytest

from storage import s3copy
from storage.backend import Backend
from storage.errors import NotFound
from storage.localdir import LocalDirBackend

from .test_backends import MiB, backend, make_s3, write_random  # noqa: F401  (fixture)


async def test_copy_makes_an_equal_independent_object(backend, tmp_path):
    await backend.upload_file("dbs/a/versions/v1.tar.zst", write_random(tmp_path / "src", 3 * MiB + 7))
    info = await backend.copy("dbs/a/versions/v1.tar.zst", "dbs/b/versions/v2.tar.zst")
    assert info.size == 3 * MiB + 7
    head = await backend.head("dbs/b/versions/v2.tar.zst")
    assert head is not None and head.size == info.size
    copied = b"".join([c async for c in backend.download("dbs/b/versions/v2.tar.zst")])
    assert copied == (tmp_path / "src").read_bytes()
    # deleting the source leaves the copy whole
    await backend.delete(["dbs/a/versions/v1.tar.zst"])
    again = b"".join([c async for c in backend.download("dbs/b/versions/v2.tar.zst")])
    assert again == copied
    with pytest.raises(NotFound):
        await backend.copy("dbs/a/versions/v1.tar.zst", "dbs/c/x")


async def test_local_copy_is_a_hard_link(tmp_path):
    b = LocalDirBackend(tmp_path / "store")
    await b.put("a", b"archive bytes")
    await b.copy("a", "dir/b")
    assert os.stat(tmp_path / "store" / "a").st_ino == os.stat(tmp_path / "store" / "dir" / "b").st_ino
    assert (await b.head("dir/b")).etag == (await b.head("a")).etag
    assert [o.key for o in await b.list("")] == ["a", "dir/b"]  # no temp files show


async def test_s3_multipart_server_side_copy(moto_server, tmp_path, monkeypatch):
    monkeypatch.setattr(s3copy, "MAX_SINGLE_COPY", 6 * MiB)
    monkeypatch.setattr(s3copy, "COPY_PART", 5 * MiB)
    b = make_s3(moto_server, moto_server.create_bucket())
    try:
        await b.upload_file("big", write_random(tmp_path / "big", 12 * MiB + 3))
        info = await b.copy("big", "copy")
        assert info.size == 12 * MiB + 3
        data = b"".join([c async for c in b.download("copy")])
        assert data == (tmp_path / "big").read_bytes()
    finally:
        await b.close()


async def test_generic_fallback_streams_through_a_temp_file(tmp_path):
    class NoCopy(LocalDirBackend):
        copy = Backend.copy  # the base class's fallback

    b = NoCopy(tmp_path / "store")
    await b.put("a", b"x" * 1000)
    info = await b.copy("a", "b")
    assert info.size == 1000 and (await b.get("b"))[0] == b"x" * 1000
