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
    m.version, m.base_backup = version, None
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


async def test_the_wal_a_kept_base_backup_continues_stays(tmp_path, monkeypatch):
    """An online base backup continues the WAL prefix of the version its running copy came
    from (storage/snapshots.py): when that version goes, its WAL from where the oldest kept
    base backup's replay starts stays; what ends before goes."""
    backend = LocalDirBackend(tmp_path / "store")
    versions = [_version(10 - i, f"v{i:03d}") for i in range(3)]  # v000 stopped; v001, v002 base backups of it
    await _seed(backend, versions, current=versions[-1])
    seg = 16 << 20
    for n in range(1, 6):  # segments 1..5 under v000
        await backend.put(f"dbs/app/wal/{versions[0]}/00000001000000000000000{n}.zst", b"wal")
    starts = {versions[1]: "0/3000028", versions[2]: "0/5000028"}

    async def manifest(db_id, version):
        m = await _fake_manifest(db_id, version)
        if version in starts:
            m.base_backup = {"wal": versions[0], "start_lsn": starts[version], "segment_size": seg}
        return m

    store = SnapshotStore(backend, tmp_path / "spool", keep_last=2)
    monkeypatch.setattr(store, "manifest", manifest)
    assert await store.prune("app") == [versions[0]]
    left = sorted(o.key.rsplit("/", 1)[1] for o in await backend.list("dbs/app/wal/"))
    # v001 replays from segment 3 on: 1 and 2 went with v000, the rest stays
    assert left == [f"00000001000000000000000{n}.zst" for n in (3, 4, 5)]
    assert await _remaining(backend) == versions[1:]

    # the oldest kept base backup now replays from segment 5
    store.keep_last = 1
    assert await store.prune("app") == [versions[1]]
    left = sorted(o.key.rsplit("/", 1)[1] for o in await backend.list("dbs/app/wal/"))
    assert left == ["000000010000000000000005.zst"]

    # once no kept base backup continues it (a stop-time version is current), the rest goes
    newer = _version(1, "v003")
    await _seed(backend, [newer], current=newer)
    assert await store.prune("app") == [versions[2]]
    assert await backend.list("dbs/app/wal/") == []
