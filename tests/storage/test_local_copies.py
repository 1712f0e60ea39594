"""Local copies restored from storage: on disk for good before they are declared clean, and
the whole-tree work of restoring and evicting them never stalls the event loop; a base backup
of a running copy is that copy's own (no conflict), another's is a conflict."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest

from gateway.compute.instances import InstanceManager
from gateway.config import Settings
from storage import atomic, cache
from storage.cache import Databases
from storage.local import LocalCatalog
from storage.localdir import LocalDirBackend
from storage.osuser import RunAs
from storage.errors import CorruptArchive
from storage.snapshots import Manifest, SnapshotStore


def _databases(tmp_path: Path, budget_bytes: int = 0) -> Databases:
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    store = SnapshotStore(LocalDirBackend(tmp_path / "store"), tmp_path / "spool")
    return Databases(catalog, store, budget_bytes=budget_bytes)


async def _stored(tmp_path: Path, databases: Databases, db_id: str) -> Manifest:
    """A small data directory (nested directories, an empty one) stored as `db_id`'s version."""
    src = tmp_path / f"src-{db_id}" / "pgdata"
    (src / "base" / "1").mkdir(parents=True)
    (src / "global").mkdir()
    (src / "pg_tblspc").mkdir()
    (src / "PG_VERSION").write_text("18\n")
    (src / "base" / "1" / "16384").write_bytes(os.urandom(8192))
    (src / "global" / "pg_control").write_bytes(os.urandom(512))
    return await databases.store.snapshot(db_id, src, {}, expect=None)


# --- durability ----------------------------------------------------------------------------------

@pytest.mark.parametrize("with_syncfs", [True, False], ids=["syncfs", "fsync-each"])
async def test_a_restored_copy_is_durable_before_it_is_declared_clean(tmp_path, monkeypatch, with_syncfs):
    databases = _databases(tmp_path)
    manifest = await _stored(tmp_path, databases, "app")
    events: list[tuple[str, str]] = []  # ("sync" | "syncfs" | "rename", path), in order

    def where(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def spy(kind, real, path_of):
        def call(*args):
            events.append((kind, path_of(*args)))
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", spy("sync", os.fsync, where))
    monkeypatch.setattr(os, "replace", spy("rename", os.replace, lambda src, dst: str(dst)))
    monkeypatch.setattr(os, "rename", spy("rename", os.rename, lambda src, dst: str(dst)))
    if with_syncfs:
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "syncfs"):
            pytest.skip("no syncfs in this C library")
        monkeypatch.setattr(atomic, "_syncfs", spy("syncfs", libc.syncfs, where), raising=False)
    else:
        monkeypatch.setattr(atomic, "_syncfs", None, raising=False)

    await databases.install("app", manifest)

    root, target = databases.catalog.root, databases.catalog.db_dir("app")
    declared = next(i for i, (kind, path) in enumerate(events)
                    if kind == "rename" and path.endswith("/state.json") and "/.restore-" in path)
    work = Path(events[declared][1]).parent
    placed = events.index(("rename", str(target)))
    before = events[:declared]
    # everything restored was made durable before state.json said the copy is clean ...
    if with_syncfs:
        assert ("syncfs", str(work)) in before
    else:
        restored = [p for p in target.rglob("*") if p.name != "state.json"]
        assert {str(work / p.relative_to(target)) for p in restored} | {str(work)} <= \
            {path for kind, path in before if kind == "sync"}
    # ... state.json's own entry before the copy was renamed into place, and that rename
    # before install() returned
    assert ("sync", str(work)) in events[declared + 1:placed]
    assert ("sync", str(root)) in events[placed + 1:]
    assert databases.state("app").dirty is False
    assert (target / "pgdata" / "base" / "1" / "16384").stat().st_size == 8192


async def test_a_state_change_is_durable_once_written(tmp_path, monkeypatch):
    """The state file's rename is fsynced in its directory: after a power loss a copy just
    saved must not read as "dirty, from the version before" (its next save would be refused
    as a conflict and the copy set aside)."""
    databases = _databases(tmp_path)
    manifest = await _stored(tmp_path, databases, "st")
    await databases.install("st", manifest)
    synced: list[Path] = []
    monkeypatch.setattr(cache, "fsync_dir", lambda d: synced.append(Path(d)))
    databases.mark_stopped("st", changed=True)
    assert databases.catalog.db_dir("st") in synced


def test_sync_tree_syncs_every_file_and_directory_without_syncfs(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "f").write_text("x")
    (tmp_path / "a" / "b" / "g").write_text("y")
    os.symlink("f", tmp_path / "a" / "link")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    monkeypatch.setattr(atomic, "_syncfs", None)
    atomic.sync_tree(tmp_path / "a")
    assert sorted(synced) == sorted(str(tmp_path / p) for p in ("a", "a/b", "a/f", "a/b/g"))


# --- the event loop keeps running ----------------------------------------------------------------

def _slow(fn):
    def slow(*args, **kwargs):
        time.sleep(0.5)  # blocks only the thread it runs in
        return fn(*args, **kwargs)
    return slow


async def _longest_stall(awaitable):
    """Await `awaitable` beside a 10 ms ticker: (the longest the ticker waited, its result)."""
    gaps, last = [], [time.monotonic()]

    async def tick():
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last[0])
            last[0] = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)  # ticking before the work starts
    try:
        result = await awaitable
    finally:
        ticker.cancel()
    gaps.append(time.monotonic() - last[0])  # a stall at the very end counts too
    return max(gaps), result


async def test_replacing_a_local_copy_does_not_block_the_loop(tmp_path, monkeypatch):
    databases = _databases(tmp_path)
    manifest = await _stored(tmp_path, databases, "app")
    await databases.install("app", manifest)
    monkeypatch.setattr(shutil, "rmtree", _slow(shutil.rmtree))
    stall, _ = await _longest_stall(databases.install("app", manifest))  # removes the old copy
    assert stall < 0.3
    assert [p.name for p in databases.catalog.root.iterdir() if p.name.startswith(".trash-")] == []


async def test_eviction_does_not_block_the_loop(tmp_path, monkeypatch):
    databases = _databases(tmp_path, budget_bytes=1)
    for db_id in ("a", "b"):
        await databases.install(db_id, await _stored(tmp_path, databases, db_id))
    monkeypatch.setattr(cache, "disk_usage", _slow(cache.disk_usage))
    monkeypatch.setattr(shutil, "rmtree", _slow(shutil.rmtree))

    manager = InstanceManager(Settings(data_root=str(databases.catalog.root), lease_seconds=0), databases)
    stall, _ = await _longest_stall(manager.maintain())  # keeps the cache within its budget
    assert stall < 0.3
    assert databases.catalog.list() == []


def test_a_new_database_is_durable_before_it_shows(tmp_path, monkeypatch):
    """A database made in `staging` (template clone, import) is synced before its rename and
    the rename made durable: Postgres syncs only what it writes itself."""
    from storage import local

    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    calls: list[tuple[str, Path]] = []
    monkeypatch.setattr(local, "sync_tree", lambda p: calls.append(("sync", Path(p))))
    monkeypatch.setattr(local, "fsync_dir", lambda p: calls.append(("fsync_dir", Path(p))))
    with catalog.staging("fresh") as pgdata:
        pgdata.mkdir()
        (pgdata / "PG_VERSION").write_text("18\n")
        assert not catalog.db_dir("fresh").exists()
    kinds = [k for k, _ in calls]
    assert kinds == ["sync", "fsync_dir"], calls
    assert calls[0][1].parent == catalog.root and calls[1][1] == catalog.root


# --- online base backups ---------------------------------------------------------------------------

BASE = {"timeline": 1, "start_lsn": "0/2000028", "end_lsn": "0/2000100", "checkpoint_lsn": "0/2000060",
        "segment_size": 16 << 20}


async def test_a_base_backup_of_the_running_copy_is_its_own_even_after_a_crash(tmp_path):
    """The copy's state names a base backup as pending before the pointer moves to it: a crash
    between the two leaves a copy that still descends from storage's current version."""
    databases = _databases(tmp_path)
    first = await _stored(tmp_path, databases, "app")
    await databases.install("app", first)
    databases.mark_running("app")
    cur = await databases.current("app", fresh=True)
    src = tmp_path / "src-app" / "pgdata"
    base = await databases.store.snapshot("app", src, {}, expect=cur, make_current=False,
                                          base_backup={**BASE, "wal": first.version})
    assert (await databases.current("app", fresh=True)).manifest.version == first.version
    assert base.format == 3 and base.wal_prefix == first.version and base.parent == first.version
    # the pointer moved, then the gateway died before the state followed
    state = databases.state("app")
    state.pending_base = base.version
    databases.save_state("app", state)
    await databases.store.set_current("app", base.version, cur)
    databases.recover()  # the next gateway: a copy left running counts as changed
    assert await databases.catch_up("app") is None and not databases.set_aside_copies("app")
    state = databases.state("app")
    assert (state.version, state.wal_prefix, state.pending_base, state.dirty) == \
        (base.version, first.version, None, True)
    saved = await databases.save("app")  # the stop-time snapshot: a child with a prefix of its own
    assert saved.parent == base.version and databases.state("app").wal_prefix == saved.version

    # a base backup this copy did not make (another gateway's) is a conflict as ever
    databases.mark_running("app")
    databases.mark_stopped("app", changed=True)
    other = await databases.store.snapshot("app", src, {}, base_backup={**BASE, "wal": saved.version})
    assert await databases.catch_up("app") == other and databases.set_aside_copies("app")


def test_a_base_backup_manifest_is_format_3():
    manifest = Manifest(db_id="a", version="v", created="t", pg_major="15", roles={}, archive={},
                        file_list={"count": 0, "parts": []}, base_backup={**BASE, "wal": "w"}, format=3)
    assert Manifest.from_json(manifest.to_json()) == manifest
    for wrong in ({"base_backup": None}, {"format": 2}):
        with pytest.raises(CorruptArchive):
            Manifest.from_json(dataclasses.replace(manifest, **wrong).to_json())


# --- the data root's own files -------------------------------------------------------------------
def test_the_gateways_name_file_is_never_a_database_id(tmp_path):
    """A database may be called "gateway-id" (a valid id): the data root's own file must not
    take that name, or the database could not be made (and one made first broke the start)."""
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    name = catalog.identity()
    catalog.db_dir("gateway-id").mkdir()  # as a new database's directory is made
    assert catalog.identity() == name


def test_a_data_root_named_by_an_older_gateway_keeps_its_name(tmp_path):
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    (catalog.root / "gateway-id").write_text("old-host-1a2b3c4d\n")  # where older versions kept it
    assert catalog.identity() == "old-host-1a2b3c4d"
    assert not (catalog.root / "gateway-id").exists(), "moved aside: the name is free for a database"
    assert catalog.identity() == "old-host-1a2b3c4d"
