"""The storage contract, run against both backends: a local directory (LocalDirBackend) and
the S3 API on a real moto server (S3Backend). Then what only one of them can show: S3
outages (server stopped, server hanging, error answers) and local file-system details."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import multiprocessing
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from aiohttp import web

from storage import backend as backend_mod
from storage.errors import NotFound, PreconditionFailed, StorageError, StorageUnavailable
from storage.localdir import LocalDirBackend
from storage.s3 import S3Backend, _multipart_etag

from ..support.moto import REGION

SECRET = "s3cr3t-Kq7vZ-never-shown"  # moto accepts any key; we look for this in messages
ACCESS = "AKIATESTPGSNI"
PREFIX = "pfx"
MiB = 1 << 20


def make_s3(moto, bucket: str, **kw) -> S3Backend:
    opts = dict(endpoint_url=moto.endpoint_url, region=REGION, access_key=ACCESS,
                secret_key=SECRET, part_size=5 * MiB, attempts=2, timeout=5)
    opts.update(kw)
    return S3Backend(bucket, PREFIX, **opts)


@pytest.fixture(params=["local", "s3"])
async def backend(request, tmp_path):
    if request.param == "local":
        b = LocalDirBackend(tmp_path / "store", prefix=PREFIX)
    else:
        moto = request.getfixturevalue("moto_server")
        b = make_s3(moto, moto.create_bucket())
    yield b
    await b.close()


def write_random(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(os.urandom(n))
            left -= n
    return path


async def read_all(b, key: str) -> bytes:
    return b"".join([chunk async for chunk in b.download(key)])


# --- the contract, on both backends ---------------------------------------------------------------

async def test_put_get_round_trip_and_etag(backend):
    etag = await backend.put("dbs/a/current.json", b'{"v": 1}')
    assert etag and '"' not in etag
    data, got_etag = await backend.get("dbs/a/current.json")
    assert data == b'{"v": 1}' and got_etag == etag
    info = await backend.head("dbs/a/current.json")
    assert (info.key, info.size, info.etag) == ("dbs/a/current.json", 8, etag)

    etag2 = await backend.put("dbs/a/current.json", b'{"v": 2}')
    assert etag2 != etag
    assert await backend.get("dbs/a/current.json") == (b'{"v": 2}', etag2)
    # equal content, equal etag (both backends hash the content)
    assert await backend.put("dbs/b/current.json", b'{"v": 2}') == etag2


async def test_empty_object(backend):
    etag = await backend.put("empty", b"")
    assert await backend.get("empty") == (b"", etag)
    info = await backend.head("empty")
    assert (info.size, info.etag) == (0, etag)
    assert await read_all(backend, "empty") == b""


async def test_modified_is_when_the_store_took_the_write(backend, tmp_path):
    """ObjectInfo.modified, by the store's clock (here this machine's; S3 gives whole
    seconds): head, list, upload_file and copy all carry it."""
    before = time.time() - 1
    await backend.put("k", b"x")
    info = await backend.head("k")
    assert before <= info.modified <= time.time()
    assert [i.modified for i in await backend.list("k")] == [info.modified]
    uploaded = await backend.upload_file("u", _write(tmp_path / "f", b"y"))
    copied = await backend.copy("u", "c")
    assert before <= uploaded.modified <= copied.modified <= time.time()


async def test_get_missing_raises_not_found(backend):
    with pytest.raises(NotFound):
        await backend.get("dbs/nope/current.json")
    await backend.put("dbs/a", b"x")
    with pytest.raises(NotFound):
        await backend.get("dbs/a/below-a-file")


async def test_download_missing_raises_not_found(backend):
    with pytest.raises(NotFound):
        await read_all(backend, "dbs/nope/snap.tar.zst")


async def test_put_if_none_match(backend):
    etag = await backend.put("k", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await backend.put("k", b"second", if_none_match=True)
    assert await backend.get("k") == (b"first", etag)


async def test_put_if_match(backend):
    old = await backend.put("k", b"one")
    current = await backend.put("k", b"two")
    with pytest.raises(PreconditionFailed):
        await backend.put("k", b"three", if_match=old)
    assert await backend.get("k") == (b"two", current)

    new = await backend.put("k", b"three", if_match=current)
    assert new != current
    assert await backend.get("k") == (b"three", new)
    # the etag we just replaced is stale now
    with pytest.raises(PreconditionFailed):
        await backend.put("k", b"four", if_match=current)
    # an object that is gone cannot match anything
    with pytest.raises(PreconditionFailed):
        await backend.put("gone", b"x", if_match=new)
    assert await backend.head("gone") is None


async def test_upload_small_file(backend, tmp_path):
    src = write_random(tmp_path / "small.bin", 300_000)
    sent: list[int] = []
    info = await backend.upload_file("dbs/a/snap-1.tar.zst", src, progress=sent.append)
    assert info.key == "dbs/a/snap-1.tar.zst" and info.size == 300_000
    assert sum(sent) == 300_000
    assert await backend.head("dbs/a/snap-1.tar.zst") == info
    assert await read_all(backend, "dbs/a/snap-1.tar.zst") == src.read_bytes()


async def test_upload_large_file(backend, tmp_path):
    size = 12 * MiB + 123
    src = write_random(tmp_path / "big.bin", size)
    sent: list[int] = []
    info = await backend.upload_file("dbs/a/snap-2.tar.zst", src, progress=sent.append)
    assert info.size == size and sum(sent) == size
    if isinstance(backend, S3Backend):
        assert sent == [5 * MiB, 5 * MiB, 2 * MiB + 123]  # one call per part
        assert info.etag.endswith("-3")  # it really was a multipart upload
    else:
        assert info.etag == hashlib.sha256(src.read_bytes()).hexdigest()
    chunks = [c async for c in backend.download("dbs/a/snap-2.tar.zst")]
    assert len(chunks) > 1 and max(map(len, chunks)) <= MiB
    assert b"".join(chunks) == src.read_bytes()
    assert await backend.head("dbs/a/snap-2.tar.zst") == info


async def test_upload_replaces_existing(backend, tmp_path):
    await backend.put("k", b"old")
    src = tmp_path / "f"
    src.write_bytes(b"new content")
    info = await backend.upload_file("k", src)
    assert await backend.get("k") == (b"new content", info.etag)


async def test_upload_missing_file_is_an_error(backend, tmp_path):
    with pytest.raises(StorageError):
        await backend.upload_file("k", tmp_path / "does-not-exist")
    assert await backend.head("k") is None


async def test_get_refuses_objects_above_the_small_limit(backend, monkeypatch):
    monkeypatch.setattr(backend_mod, "MAX_SMALL_OBJECT", 1000)
    await backend.put("big", b"x" * 2000)
    with pytest.raises(StorageError) as e:
        await backend.get("big")
    assert not isinstance(e.value, NotFound)
    assert await read_all(backend, "big") == b"x" * 2000


async def test_head_missing_is_none(backend):
    assert await backend.head("dbs/nope") is None
    await backend.put("dbs/yes", b"1")
    assert await backend.head("dbs") is None  # a "directory" is not an object


async def test_list_with_prefix(backend):
    contents = {"dbs/b/current.json": b"bb", "dbs/a/snap/1.tar.zst": b"snap",
                "dbs/a/current.json": b"a", "dbs/ab/current.json": b"abab!", "other/z": b"z"}
    etags = {k: await backend.put(k, v) for k, v in contents.items()}

    everything = await backend.list("")
    assert [i.key for i in everything] == sorted(contents)
    assert all(i.size == len(contents[i.key]) and i.etag == etags[i.key] for i in everything)

    assert [i.key for i in await backend.list("dbs/a")] == [
        "dbs/a/current.json", "dbs/a/snap/1.tar.zst", "dbs/ab/current.json"]
    assert [i.key for i in await backend.list("dbs/a/")] == [
        "dbs/a/current.json", "dbs/a/snap/1.tar.zst"]
    assert [i.key for i in await backend.list("dbs/")] == sorted(k for k in contents if k.startswith("dbs/"))
    assert await backend.list("nothing/") == []
    assert await backend.list("dbs/c") == []


async def test_delete(backend):
    await backend.put("dbs/a/1", b"1")
    await backend.put("dbs/a/2", b"2")
    await backend.put("dbs/b/1", b"3")
    await backend.delete(["dbs/a/1", "dbs/a/2", "dbs/a/never-existed"])
    assert await backend.head("dbs/a/1") is None and await backend.head("dbs/a/2") is None
    with pytest.raises(NotFound):
        await backend.get("dbs/a/1")
    assert [i.key for i in await backend.list("")] == ["dbs/b/1"]
    await backend.delete([])
    await backend.delete(["dbs/a/1"])  # again: still fine
    assert [i.key for i in await backend.list("")] == ["dbs/b/1"]


async def test_delete_in_batches(backend, monkeypatch):
    import storage.s3
    monkeypatch.setattr(storage.s3, "DELETE_BATCH", 3)  # S3 takes 1000 per DeleteObjects
    keys = [f"many/{i:02d}" for i in range(10)]
    await asyncio.gather(*(backend.put(k, b"x") for k in keys))
    await backend.put("keep", b"k")
    assert len(await backend.list("many/")) == 10
    await backend.delete(keys + ["many/missing"])
    assert [i.key for i in await backend.list("")] == ["keep"]


BAD_KEYS = ["", "/abs", "abs/", "a//b", "..", "a/../b", "../escape", "a/./b", ".", "a\x00b",
            ".hidden", "a/.etag", "a\nb", "a\\b", "x" * 1025]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_are_refused(backend, key):
    for call in (lambda: backend.get(key), lambda: backend.put(key, b"x"),
                 lambda: backend.head(key), lambda: backend.delete(["ok", key]),
                 lambda: read_all(backend, key)):
        with pytest.raises(StorageError) as e:
            await call()
        assert type(e.value) is StorageError and "invalid storage key" in str(e.value)
    assert await backend.list("") == []


async def test_invalid_upload_key_is_refused(backend, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError, match="invalid storage key"):
        await backend.upload_file("../../etc/passwd", src)


@pytest.mark.parametrize("prefix", ["/abs", "../x", "a//", "a/../b/", ".x"])
async def test_invalid_list_prefix_is_refused(backend, prefix):
    with pytest.raises(StorageError, match="invalid storage prefix"):
        await backend.list(prefix)


async def test_describe_names_the_place_without_secrets(backend):
    d = backend.describe()
    if isinstance(backend, S3Backend):
        assert d.startswith(f"s3://{backend.bucket}/{PREFIX} (endpoint http://127.0.0.1:")
        assert SECRET not in d and SECRET not in repr(backend)
    else:
        assert d == f"directory {backend.root / PREFIX}"


async def test_backend_prefix_is_where_objects_go(backend):
    await backend.put("dbs/a/current.json", b"x")
    if isinstance(backend, S3Backend):
        listed = _moto_client(backend).list_objects_v2(Bucket=backend.bucket)
        assert [o["Key"] for o in listed["Contents"]] == [f"{PREFIX}/dbs/a/current.json"]
    else:
        assert (backend.root / PREFIX / "dbs" / "a" / "current.json").read_bytes() == b"x"


def _moto_client(b: S3Backend):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=b.endpoint_url, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(s3={"addressing_style": "path"}))


# --- local directory only ---------------------------------------------------------------------------

async def test_local_files_are_private_and_no_temp_files_remain(tmp_path):
    b = LocalDirBackend(tmp_path / "store")
    await b.put("dbs/a/current.json", b"x")
    src = write_random(tmp_path / "src", 3 * MiB)
    await b.upload_file("dbs/a/snap.tar.zst", src)
    root = tmp_path / "store"
    assert stat.S_IMODE((root / "dbs").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "dbs" / "a").stat().st_mode) == 0o700
    for name in ("current.json", "snap.tar.zst"):
        assert stat.S_IMODE((root / "dbs" / "a" / name).stat().st_mode) == 0o600
    names = sorted(os.listdir(root / "dbs" / "a"))
    assert names == [".current.json.etag", ".snap.tar.zst.etag", "current.json", "snap.tar.zst"]
    await b.delete(["dbs/a/current.json", "dbs/a/snap.tar.zst"])
    assert os.listdir(root / "dbs" / "a") == []


async def test_local_list_skips_temp_sidecar_lock_and_stray_files(tmp_path):
    b = LocalDirBackend(tmp_path)
    await b.put("a/k", b"x")
    (tmp_path / "a" / ".k.tmp-123456").write_bytes(b"half")
    (tmp_path / ".hidden-dir").mkdir()
    (tmp_path / ".hidden-dir" / "f").write_bytes(b"x")
    os.symlink("/etc", tmp_path / "a" / "link-dir")
    assert (tmp_path / ".pgsni-storage.lock").exists()
    assert [i.key for i in await b.list("")] == ["a/k"]


async def test_local_etag_follows_content_changed_behind_its_back(tmp_path):
    """Another machine writing through s3fs leaves our sidecar stale: head/list notice."""
    b = LocalDirBackend(tmp_path)
    old = await b.put("k", b"ours")
    os.replace(_write(tmp_path / "other", b"theirs, longer"), tmp_path / "k")
    new = hashlib.sha256(b"theirs, longer").hexdigest()
    info = await b.head("k")
    assert (info.size, info.etag) == (14, new)
    assert [i.etag for i in await b.list("")] == [new]
    with pytest.raises(PreconditionFailed):
        await b.put("k", b"mine", if_match=old)
    await b.put("k", b"mine", if_match=new)
    # a lying sidecar (same stamp, wrong etag) cannot let a conditional write through
    sidecar = tmp_path / ".k.etag"
    sidecar.write_text(sidecar.read_text().replace(hashlib.sha256(b"mine").hexdigest(), "f" * 64))
    assert (await b.head("k")).etag == "f" * 64
    with pytest.raises(PreconditionFailed):
        await b.put("k", b"x", if_match="f" * 64)


async def test_local_key_shadowed_by_a_directory_is_an_error_not_an_outage(tmp_path):
    b = LocalDirBackend(tmp_path)
    await b.put("a/b", b"x")
    with pytest.raises(StorageError) as e:
        await b.put("a", b"y")
    assert not isinstance(e.value, StorageUnavailable)
    with pytest.raises(StorageError) as e:
        await b.put("a/b/c", b"y")
    assert not isinstance(e.value, StorageUnavailable)
    assert await b.get("a/b") == (b"x", hashlib.sha256(b"x").hexdigest())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_local_head_hashes_large_files_in_chunks(tmp_path, monkeypatch):
    b = LocalDirBackend(tmp_path)
    src = write_random(tmp_path / "src", 5 * MiB)
    info = await b.upload_file("big", src)
    (tmp_path / ".big.etag").unlink()  # force a re-hash
    reads: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import storage.localdir as localdir
    monkeypatch.setattr(localdir, "open", lambda p, mode="r": Spy(real_open(p, mode)), raising=False)
    assert await b.head("big") == info
    assert reads and all(0 < n <= MiB for n in reads)
    assert (tmp_path / ".big.etag").exists()  # cached again


def _increment_worker(root: str, rounds: int) -> int:
    async def run() -> int:
        b = LocalDirBackend(Path(root))
        conflicts = 0
        for _ in range(rounds):
            while True:
                data, etag = await b.get("counter")
                try:
                    await b.put("counter", str(int(data) + 1).encode(), if_match=etag)
                    break
                except PreconditionFailed:
                    conflicts += 1
        return conflicts
    return asyncio.run(run())


def _create_worker(root: str, n: int) -> bool:
    async def run() -> bool:
        try:
            await LocalDirBackend(Path(root)).put("winner", str(n).encode(), if_none_match=True)
            return True
        except PreconditionFailed:
            return False
    return asyncio.run(run())


@pytest.mark.slow
async def test_local_conditional_writes_are_atomic_across_processes(tmp_path):
    b = LocalDirBackend(tmp_path)
    await b.put("counter", b"0")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as pool:
        created = list(pool.map(_create_worker, [str(tmp_path)] * 8, range(8)))
        futures = [pool.submit(_increment_worker, str(tmp_path), 40) for _ in range(4)]
        for f in futures:
            f.result()
    assert created.count(True) == 1
    winner = int((await b.get("winner"))[0])
    assert created[winner] is True
    assert await b.get("counter") == (b"160", hashlib.sha256(b"160").hexdigest())


# --- S3 only: outages and error answers -----------------------------------------------------------

SU_BUDGET = 15.0


async def _expect_unavailable(b: S3Backend, call) -> float:
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable) as e:
        await call()
    elapsed = time.monotonic() - t0
    assert elapsed < SU_BUDGET
    msg = str(e.value)
    assert b.bucket in msg and msg.startswith(f"storage s3://{b.bucket}/{PREFIX} is unavailable: ")
    assert SECRET not in msg and ACCESS not in msg
    return elapsed


async def test_s3_outage_fails_fast_and_the_client_recovers(moto_server, tmp_path):
    bucket = moto_server.create_bucket()
    b = make_s3(moto_server, bucket, attempts=2, timeout=2)
    try:
        etag = await b.put("dbs/a/current.json", b"1")
        moto_server.stop()
        await _expect_unavailable(b, lambda: b.get("dbs/a/current.json"))
        await _expect_unavailable(b, lambda: b.put("dbs/a/current.json", b"2", if_match=etag))
        await _expect_unavailable(b, lambda: b.head("dbs/a/current.json"))
        await _expect_unavailable(b, lambda: b.list("dbs/"))
        await _expect_unavailable(b, lambda: b.delete(["dbs/a/current.json"]))
        await _expect_unavailable(b, lambda: read_all(b, "dbs/a/current.json"))
        src = tmp_path / "f"
        src.write_bytes(b"file")
        await _expect_unavailable(b, lambda: b.upload_file("dbs/a/f", src))

        moto_server.start()  # same port, empty state
        moto_server.create_bucket(bucket)
        assert await b.head("dbs/a/current.json") is None
        etag = await b.put("dbs/a/current.json", b"back")
        assert await b.get("dbs/a/current.json") == (b"back", etag)
        assert (await b.upload_file("dbs/a/f", src)).size == 4
    finally:
        await b.close()


async def test_s3_hanging_endpoint_times_out(tmp_path):
    """A server that accepts connections but never answers: each attempt ends at `timeout`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
        b = S3Backend("hung-bucket", endpoint_url=f"http://127.0.0.1:{s.getsockname()[1]}",
                      region=REGION, access_key=ACCESS, secret_key=SECRET, attempts=2, timeout=1)
        try:
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match="hung-bucket") as e:
                await b.get("k")
            elapsed = time.monotonic() - t0
            assert 1.9 < elapsed < 5, elapsed  # two attempts of 1 s plus 0.2 s backoff
            assert SECRET not in str(e.value)
        finally:
            await b.close()


async def test_s3_multipart_interrupted_by_outage_then_retried(moto_server, tmp_path):
    bucket = moto_server.create_bucket()
    b = make_s3(moto_server, bucket, attempts=2, timeout=2)
    src = write_random(tmp_path / "big.bin", 12 * MiB)
    sent: list[int] = []

    def progress(n: int) -> None:
        sent.append(n)
        if len(sent) == 1:
            moto_server.stop()  # the bucket goes away after the first part

    try:
        await _expect_unavailable(b, lambda: b.upload_file("dbs/a/snap.tar.zst", src, progress=progress))
        assert sent == [5 * MiB]

        moto_server.start()
        moto_server.create_bucket(bucket)
        sent.clear()
        info = await b.upload_file("dbs/a/snap.tar.zst", src, progress=sent.append)
        assert info.size == 12 * MiB and sum(sent) == 12 * MiB
        assert await read_all(b, "dbs/a/snap.tar.zst") == src.read_bytes()
    finally:
        await b.close()


async def test_s3_failed_multipart_upload_is_aborted(moto_server, tmp_path):
    bucket = moto_server.create_bucket()
    b = make_s3(moto_server, bucket)
    src = write_random(tmp_path / "big.bin", 11 * MiB)

    def progress(n: int) -> None:
        raise RuntimeError("caller gave up")

    try:
        with pytest.raises(RuntimeError, match="caller gave up"):
            await b.upload_file("dbs/a/snap.tar.zst", src, progress=progress)
        client = moto_server.client()
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert await b.head("dbs/a/snap.tar.zst") is None
    finally:
        await b.close()


async def test_s3_versioned_bucket_keeps_the_contract(moto_server):
    bucket = moto_server.create_bucket(versioning=True)
    b = make_s3(moto_server, bucket)
    try:
        e1 = await b.put("k", b"1", if_none_match=True)
        e2 = await b.put("k", b"2", if_match=e1)
        assert await b.get("k") == (b"2", e2)
        await b.delete(["k"])
        assert await b.head("k") is None and await b.list("") == []
        with pytest.raises(NotFound):
            await b.get("k")
        await b.put("k", b"3", if_none_match=True)  # a delete marker is "absent"
    finally:
        await b.close()


async def test_s3_missing_bucket_is_not_not_found(moto_server):
    b = make_s3(moto_server, "no-such-bucket-here")
    try:
        with pytest.raises(StorageError, match="NoSuchBucket") as e:
            await b.get("k")
        assert not isinstance(e.value, (NotFound, StorageUnavailable))
    finally:
        await b.close()


def test_multipart_etag_matches_s3s():
    # md5 of the concatenated binary part md5s, then "-<parts>"
    parts = [hashlib.md5(b"a" * 10).hexdigest(), hashlib.md5(b"b").hexdigest()]
    digest = hashlib.md5(bytes.fromhex(parts[0]) + bytes.fromhex(parts[1])).hexdigest()
    assert _multipart_etag([f'"{p}"' for p in parts]) == f"{digest}-2"


class FakeS3:
    """An aiohttp server that answers every request with one fixed S3 error."""

    def __init__(self, status: int, code: str) -> None:
        self.status, self.code, self.requests = status, code, 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
                f"<Message>fake {self.code}</Message></Error>")
        return web.Response(status=self.status, body=body.encode(), content_type="application/xml")

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError")])
async def test_s3_server_errors_are_retried_then_unavailable(status, code):
    fake = FakeS3(status, code)
    async with fake as url:
        b = S3Backend("bkt", PREFIX, endpoint_url=url, region=REGION, access_key=ACCESS,
                      secret_key=SECRET, attempts=3, timeout=2)
        try:
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match=code) as e:
                await b.put("k", b"x")
            assert fake.requests == 3  # our attempts, and no hidden botocore retries
            assert time.monotonic() - t0 >= 0.55  # backoff 0.2 s + 0.4 s between them
            assert "s3://bkt/pfx" in str(e.value) and SECRET not in str(e.value)
        finally:
            await b.close()


async def test_s3_client_errors_are_not_retried():
    fake = FakeS3(403, "AccessDenied")
    async with fake as url:
        b = S3Backend("bkt", endpoint_url=url, region=REGION, access_key=ACCESS,
                      secret_key=SECRET, attempts=3, timeout=2)
        try:
            with pytest.raises(StorageError, match="AccessDenied") as e:
                await b.get("k")
            assert not isinstance(e.value, (NotFound, StorageUnavailable))
            assert fake.requests == 1
        finally:
            await b.close()


async def test_s3_conditional_conflict_409_is_precondition_failed():
    fake = FakeS3(409, "ConditionalRequestConflict")
    async with fake as url:
        b = S3Backend("bkt", endpoint_url=url, region=REGION, access_key=ACCESS,
                      secret_key=SECRET, attempts=3, timeout=2)
        try:
            with pytest.raises(PreconditionFailed):
                await b.put("k", b"x", if_none_match=True)
            assert fake.requests == 1
        finally:
            await b.close()


class AnswerLosingProxy:
    """Forwards everything to moto, but swallows the answer to the first PUT of an object:
    the write happens, the client only sees a timeout."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.lost, self.runner = upstream, 0, None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        import aiohttp
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, self.upstream + request.path_qs,
                                       headers=headers, data=body) as up:
                data = await up.read()
                drop = {"transfer-encoding", "server", "date"}
                if request.method != "HEAD":
                    drop.add("content-length")  # aiohttp sets it from the body
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in drop}
                status = up.status
        if request.method == "PUT" and request.path.count("/") > 1 and not self.lost:
            self.lost += 1
            await asyncio.sleep(30)  # written upstream; the answer never comes
        if request.method == "HEAD":
            return web.Response(status=status, headers=out_headers)
        return web.Response(status=status, body=data, headers=out_headers)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


@pytest.mark.parametrize("condition", ["if_none_match", "if_match"])
async def test_s3_conditional_put_whose_answer_was_lost_still_succeeds(moto_server, condition):
    """The first attempt writes but times out; the retry then fails its condition against
    our own write. That must not be reported as PreconditionFailed."""
    bucket = moto_server.create_bucket()
    direct = make_s3(moto_server, bucket)
    proxy = AnswerLosingProxy(moto_server.endpoint_url)
    async with proxy as url:
        b = make_s3(moto_server, bucket, endpoint_url=url, attempts=3, timeout=1)
        try:
            kw = {"if_none_match": True}
            if condition == "if_match":
                kw = {"if_match": await direct.put("k", b"before")}
            etag = await b.put("k", b"mine", **kw)
            assert etag == hashlib.md5(b"mine").hexdigest()
            assert await direct.get("k") == (b"mine", etag)
            assert proxy.lost == 1  # the first answer really was lost
            # and a condition that really lost is still refused
            with pytest.raises(PreconditionFailed):
                await direct.put("k", b"other", if_none_match=True)
        finally:
            await b.close()
            await direct.close()
