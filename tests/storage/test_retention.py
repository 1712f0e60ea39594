"""Retention: the newest `keep_last` versions stay, and with `keep_days` every younger one too;
the current version is never removed."""

from __future__ import annotations

import datetime as dt
import json

from storage.localdir import LocalDirBackend
from storage.snapshots import SnapshotStore


def _version(days_ago: float, tag: str) -> str:
    t = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    return t.strftime("%Y%m%dT%H%M%S.") + f"000Z-{tag}"


async def _seed(backend, versions: list[str], current: str) -> None:
    for v in versions:
        await backend.put(f"dbs/app/versions/{v}.tar.zst", b"archive")
        await backend.put(f"dbs/app/versions/{v}.json", b"{}")
    await backend.put("dbs/app/current.json", json.dumps({"version": current}).encode())


async def _remaining(backend) -> list[str]:
    return sorted(o.key.rsplit("/", 1)[1][: -len(".tar.zst")]
                  for o in await backend.list("dbs/app/versions/") if o.key.endswith(".tar.zst"))


async def test_keep_last_and_keep_days(tmp_path, monkeypatch):
    backend = LocalDirBackend(tmp_path / "store")
    old = [_version(30 - i, f"old{i:03d}") for i in range(4)]      # 30..27 days old
    young = [_version(0.5, "young1"), _version(0.1, "young2")]      # hours old
    await _seed(backend, old + young, current=old[0])               # rolled back to the oldest
    store = SnapshotStore(backend, tmp_path / "spool", keep_last=1, keep_days=7)
    # manifests are placeholders here; versions() only needs the pointer's version to exist
    monkeypatch.setattr(store, "manifest", _fake_manifest)
    removed = await store.prune("app")
    assert sorted(removed) == sorted(old[1:])
    assert await _remaining(backend) == sorted([old[0]] + young)


async def test_keep_last_alone(tmp_path, monkeypatch):
    backend = LocalDirBackend(tmp_path / "store")
    versions = [_version(10 - i, f"v{i:03d}") for i in range(5)]
    await _seed(backend, versions, current=versions[-1])
    store = SnapshotStore(backend, tmp_path / "spool", keep_last=2)
    monkeypatch.setattr(store, "manifest", _fake_manifest)
    await store.prune("app")
    assert await _remaining(backend) == versions[-2:]


async def _fake_manifest(db_id: str, version: str):
    class M:
        pass

    m = M()
    m.version = version
    return m


async def test_a_removed_version_takes_the_wal_written_after_it(tmp_path, monkeypatch):
    """WAL under a version (storage/wal.py) is replayed only onto that version: it goes with
    it, and the WAL of a kept version stays."""
    backend = LocalDirBackend(tmp_path / "store")
    versions = [_version(10 - i, f"v{i:03d}") for i in range(3)]
    await _seed(backend, versions, current=versions[-1])
    for v in versions:
        await backend.put(f"dbs/app/wal/{v}/000000010000000000000001.zst", b"wal")
    store = SnapshotStore(backend, tmp_path / "spool", keep_last=2)
    monkeypatch.setattr(store, "manifest", _fake_manifest)
    assert await store.prune("app") == [versions[0]]
    left = sorted(o.key.split("/")[3] for o in await backend.list("dbs/app/wal/"))
    assert left == versions[1:]
