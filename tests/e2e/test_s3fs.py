"""storage=s3fs through a real gateway, real Postgres, a real s3fs-fuse mount and a real S3
server (moto): snapshots go through the FUSE mount into the bucket and come back.

The FUSE tests skip (with the reason) where s3fs is not installed or FUSE does not work, which
a trial mount decides. Every mount point is unmounted in teardown, even after a failure: a
stale FUSE mount under /tmp can hang later tests. Mount points are only ever rmdir'ed, never
removed recursively (which, if still mounted, would empty the bucket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from gateway.config import Settings
from storage import s3fs
from storage.errors import StorageError, StorageUnavailable
from storage.s3fs import MountedDirBackend, mounted

from ..support.harness import GatewayThread, conninfo, processes, psql
from ..support.moto import ACCESS_KEY

SECRET = "s3fs-test-secret-" + secrets.token_hex(8)  # moto takes any; this one must never leak


# --- helpers -------------------------------------------------------------------------------------
def _s3fs_pids(path: Path) -> list[int]:
    """Pids of s3fs processes serving `path` (only ever ones this test session started)."""
    return processes(b"s3fs", path)


def _force_cleanup(path: Path) -> None:
    """Leave nothing behind at `path`: no mount (not even a dead one), no s3fs process."""
    if mounted(path):
        s3fs._unmount(path, timeout=5.0)  # lazily detaches as a last resort
    for pid in _s3fs_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if mounted(path):
        s3fs._unmount(path, timeout=1.0)
    assert not mounted(path), f"could not unmount {path}"
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _new_mountpoint() -> Path:
    return Path(tempfile.mkdtemp(prefix="pgsni-mnt-"))


def _settings_for(moto, bucket: str, mountpoint: Path, **kw) -> dict:
    base = dict(storage="s3fs", s3fs_mount=True, storage_path=str(mountpoint), s3_bucket=bucket,
                s3_prefix="pgsni/", s3_endpoint=moto.endpoint_url, s3_region="us-east-1",
                s3_access_key=ACCESS_KEY, s3_secret_key=SECRET, storage_attempts=2,
                storage_timeout=5.0)
    base.update(kw)
    return base


def _bucket_keys(moto, bucket: str, prefix: str = "") -> list[str]:
    out = moto.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fuse(_moto_session) -> None:
    """Skip unless s3fs is installed and a trial mount of a moto bucket really works."""
    if shutil.which("s3fs") is None:
        pytest.skip("s3fs-fuse is not installed (apt-get install s3fs, or ./dev setup)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse does not exist: no FUSE in this container or VM")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse is not readable and writable by this user")
    _moto_session.start()
    bucket = _moto_session.create_bucket()
    mp = _new_mountpoint()
    try:
        try:
            m = s3fs.mount(Settings(**_settings_for(_moto_session, bucket, mp, s3_prefix="")))
        except StorageError as e:
            pytest.skip(f"FUSE does not work here: a trial s3fs mount failed: {e}")
        try:
            (mp / "probe").write_text("ok")
            ok = "probe" in _bucket_keys(_moto_session, bucket)
        except OSError as e:
            pytest.skip(f"FUSE does not work here: writing through a trial s3fs mount failed: {e}")
        finally:
            m.unmount()
        if not ok:
            pytest.skip("FUSE does not work here: a file written through s3fs did not reach the bucket")
    finally:
        _force_cleanup(mp)


@pytest.fixture
def mountpoint():
    """An empty directory to mount on; request it BEFORE start_gateway so that it is torn
    down after the gateway has stopped."""
    mp = _new_mountpoint()
    yield mp
    _force_cleanup(mp)


# --- tests without FUSE ----------------------------------------------------------------------
def test_existing_mount_mode_refuses_to_start_without_a_mount(make_settings, data_root):
    plain = data_root / "not-a-mount"
    plain.mkdir()
    settings = make_settings(storage="s3fs", s3fs_mount=False, s3_bucket="some-bucket",
                             storage_path=str(plain))
    with pytest.raises(StorageError) as err:
        GatewayThread(settings).start()
    msg = str(err.value)
    assert f"nothing is mounted at storage_path {plain}" in msg and "s3fs_mount" in msg
    assert "local disk" in msg
    assert os.listdir(plain) == []  # nothing written underneath


def test_backend_refuses_to_write_once_the_mount_is_gone(tmp_path):
    # e.g. someone unmounts while the gateway runs: never fall through to the local disk
    backend = MountedDirBackend(tmp_path, "pgsni")
    src = tmp_path.parent / f"{tmp_path.name}-src"
    src.write_bytes(b"x" * 1000)

    async def attempts():
        for op in (lambda: backend.put("dbs/a/current.json", b"{}"),
                   lambda: backend.upload_file("dbs/a/versions/v.tar.zst", src),
                   lambda: backend.list("dbs/"),
                   lambda: backend.get("dbs/a/current.json")):
            with pytest.raises(StorageUnavailable, match="nothing is mounted"):
                await op()

    try:
        asyncio.run(attempts())
    finally:
        src.unlink()
    assert os.listdir(tmp_path) == []


def test_mount_without_s3fs_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no s3fs on it
    settings = Settings(storage="s3fs", s3fs_mount=True, s3_bucket="b", storage_path=str(tmp_path / "m"))
    with pytest.raises(StorageError, match="apt-get install s3fs"):
        s3fs.mount(settings)


# --- tests with a real FUSE mount ----------------------------------------------------------
def test_mount_mode_end_to_end(fuse, mountpoint, start_gateway, tls, moto_server, caplog):
    caplog.set_level(logging.DEBUG, logger="pgsni")
    bucket = moto_server.create_bucket()
    gw = start_gateway(**_settings_for(moto_server, bucket, mountpoint))
    assert mounted(mountpoint) and os.path.ismount(mountpoint)
    [pid] = _s3fs_pids(mountpoint)
    assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert gw.gw.backend.describe() == f"s3fs mount {mountpoint}"

    gw.create_db("fused")
    dsn = conninfo(gw.port, tls["ca"], "fused")
    out = psql(dsn, "create table t(x int); insert into t select generate_series(1, 1000)")
    assert out.returncode == 0, out.stderr
    gw.call(lambda: gw.gw.instances.stop("fused"))  # snapshot: through FUSE into the bucket

    keys = _bucket_keys(moto_server, bucket, "pgsni/dbs/fused/")
    assert "pgsni/dbs/fused/current.json" in keys, keys
    assert any(k.startswith("pgsni/dbs/fused/versions/") and k.endswith(".tar.zst") for k in keys), keys
    assert not any(".tmp-" in k for k in keys), keys  # no temp files left over
    versions = gw.call(lambda: gw.gw.databases.store.versions("fused"))
    assert len(versions) == 1 and versions[0].current

    shutil.rmtree(gw.gw.catalog.db_dir("fused"))  # wipe the local copy
    gw.gw.databases.forget("fused")
    out = psql(dsn, "select count(*), sum(x) from t")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000|500500"

    gw.stop()
    assert not mounted(mountpoint), "the gateway left its mount behind"
    assert _s3fs_pids(mountpoint) == []
    assert SECRET not in caplog.text
    assert not [p for p in Path(tempfile.gettempdir()).glob("pgsni-s3fs-*")
                if any(SECRET in f.read_text(errors="replace") for f in p.iterdir() if f.is_file())]


def test_existing_mount_mode_uses_the_mount_and_leaves_it(fuse, mountpoint, start_gateway,
                                                          make_settings, tls, moto_server):
    bucket = moto_server.create_bucket()
    # an operator's mount of the whole bucket; the gateway then applies s3_prefix inside it
    ours = s3fs.mount(Settings(**_settings_for(moto_server, bucket, mountpoint, s3_prefix="")))
    try:
        with pytest.raises(StorageError, match="already a mount point"):  # s3fs_mount on top
            GatewayThread(make_settings(**_settings_for(moto_server, bucket, mountpoint))).start()
        gw = start_gateway(**_settings_for(moto_server, bucket, mountpoint, s3fs_mount=False))
        gw.create_db("shared")
        assert psql(conninfo(gw.port, tls["ca"], "shared"), "create table t(x int)").returncode == 0
        gw.call(lambda: gw.gw.instances.stop("shared"))
        keys = _bucket_keys(moto_server, bucket, "pgsni/dbs/shared/")
        assert "pgsni/dbs/shared/current.json" in keys, keys  # same layout as a mount we make
        gw.stop()
        assert mounted(mountpoint), "the gateway unmounted a mount it did not make"
    finally:
        ours.unmount()
    assert not mounted(mountpoint)


def test_failed_mount_reports_s3fs_and_leaves_nothing(fuse, mountpoint, moto_server):
    settings = Settings(**_settings_for(moto_server, "no-such-bucket-" + secrets.token_hex(4), mountpoint))
    with pytest.raises(StorageUnavailable) as err:
        s3fs.mount(settings, timeout=10)
    msg = str(err.value)
    assert f"cannot mount bucket at {mountpoint}" in msg and "s3fs" in msg
    assert SECRET not in msg
    assert not mounted(mountpoint)
    assert _s3fs_pids(mountpoint) == []
