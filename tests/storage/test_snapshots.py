"""Snapshots through a real backend (a local directory): a database of 100,000 files is saved
and restored byte for byte with a manifest that stays small; the file list's parts are checked,
bounded, pruned and forked; versions saved in format 1 (file list inside the manifest) restore."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from storage import backend as backend_mod
from storage import filelist
from storage.errors import CorruptArchive, StorageError, UnsafeArchive
from storage.forking import fork_version
from storage.localdir import LocalDirBackend
from storage.snapshots import FORMAT, SnapshotStore

FILES = 100_000
DB_OID = 16384


def _content(i: int) -> bytes:
    return f"relation {i}\n".encode() * (1 + i % 7)


def _many_files(pgdata: Path, n: int) -> list[str]:
    """A PGDATA-shaped tree: PG_VERSION and `n` small relation files in one database
    directory, the way 50,000 tables (main, fsm and vm forks) look on disk."""
    base = pgdata / "base" / str(DB_OID)
    base.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("18\n")
    names = []
    for i in range(n):
        name = f"{20000 + i // 3}{('', '_fsm', '_vm')[i % 3]}"
        fd = os.open(base / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, _content(i))
        os.close(fd)
        names.append(name)
    return names


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_database_of_100k_files_is_saved_and_restored(tmp_path):
    names = _many_files(tmp_path / "pgdata", FILES)
    backend = LocalDirBackend(tmp_path / "store")
    store = SnapshotStore(backend, tmp_path / "spool")

    began = time.monotonic()
    saved = await store.snapshot("many", tmp_path / "pgdata", {}, expect=None)
    took_save = time.monotonic() - began
    # what every login reads (roles) must not grow with the number of files
    manifest_key = f"dbs/many/versions/{saved.version}.json"
    assert (await backend.head(manifest_key)).size < 64 << 10
    assert all(p["size"] < backend_mod.MAX_SMALL_OBJECT // 4 for p in saved.file_list["parts"])

    began = time.monotonic()
    cur = await store.current("many")
    await store.restore(cur.manifest, tmp_path / "restored")
    took_restore = time.monotonic() - began
    print(f"\n100k files: save {took_save:.1f} s, restore {took_restore:.1f} s")

    base = tmp_path / "restored" / "base" / str(DB_OID)
    assert sorted(os.listdir(base)) == sorted(names)
    for i, name in enumerate(names):
        assert (base / name).read_bytes() == _content(i), name
    assert (tmp_path / "restored" / "PG_VERSION").read_text() == "18\n"


# --- the file list in parts -------------------------------------------------------------------
async def test_the_small_object_limit_no_longer_bounds_the_file_count(tmp_path, monkeypatch):
    """The defect at a smaller scale: with the limit at 256 KiB, 5,000 files made a format 1
    manifest of 595 KB that was written, then every later save or restore failed reading it."""
    monkeypatch.setattr(backend_mod, "MAX_SMALL_OBJECT", 256 << 10)
    files = _small_tree(tmp_path / "pgdata", 5000)
    store = SnapshotStore(LocalDirBackend(tmp_path / "store"), tmp_path / "spool")
    await store.snapshot("db", tmp_path / "pgdata", {}, expect=None)
    await store.snapshot("db", tmp_path / "pgdata", {})  # reads the current version first
    await store.restore((await store.current("db")).manifest, tmp_path / "out")
    assert _tree(tmp_path / "out") == files


def _small_tree(pgdata: Path, n: int) -> dict[str, bytes]:
    files = {"PG_VERSION": b"18\n"} | {f"base/1/{1000 + i}": _content(i) for i in range(n)}
    for rel, data in files.items():
        (pgdata / rel).parent.mkdir(parents=True, exist_ok=True)
        (pgdata / rel).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_a_long_file_list_is_split_and_every_part_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(filelist, "PART_BYTES", 2000)
    files = _small_tree(tmp_path / "pgdata", 100)
    backend = LocalDirBackend(tmp_path / "store")
    store = SnapshotStore(backend, tmp_path / "spool")
    saved = await store.snapshot("db", tmp_path / "pgdata", {}, expect=None)
    parts = saved.file_list["parts"]
    assert len(parts) > 3 and saved.file_count == 101 == sum(p["count"] for p in parts)

    cur = await store.current("db")
    await store.restore(cur.manifest, tmp_path / "one")
    assert _tree(tmp_path / "one") == files

    # a part swapped for another one (valid in itself) is refused before any download
    await backend.put(parts[1]["key"], (await backend.get(parts[0]["key"]))[0])
    with pytest.raises(CorruptArchive, match="does not match its size and sha256"):
        await store.restore(cur.manifest, tmp_path / "two")
    assert not (tmp_path / "two").exists()
    # a missing part makes the version damaged, not the database unknown (NotFound)
    await backend.delete([parts[1]["key"]])
    with pytest.raises(CorruptArchive, match="is missing"):
        await store.restore(cur.manifest, tmp_path / "two")


async def test_more_files_than_max_restore_files_is_refused_with_the_setting_named(tmp_path):
    _small_tree(tmp_path / "pgdata", 20)
    store = SnapshotStore(LocalDirBackend(tmp_path / "store"), tmp_path / "spool",
                          max_restore_files=10)
    await store.snapshot("db", tmp_path / "pgdata", {}, expect=None)
    cur = await store.current("db")
    with pytest.raises(StorageError, match="21 files, more than max_restore_files"):
        await store.restore(cur.manifest, tmp_path / "out")


async def test_a_stored_version_with_tablespaces_is_not_restored(tmp_path):
    """A tampered store (or a copy that should never have had them): a `tablespace_map` would
    have the first start link a tablespace wherever it says, outside the database's directory;
    a link in pg_tblspc/ leads out the same way."""
    store = SnapshotStore(LocalDirBackend(tmp_path / "store"), tmp_path / "spool")
    for n, plant in enumerate((lambda d: (d / "tablespace_map").write_text("16385 /var/lib/other\n"),
                               lambda d: (d / "pg_tblspc" / "16385").symlink_to("../base"))):
        pgdata = tmp_path / f"pgdata{n}"
        _small_tree(pgdata, 3)
        (pgdata / "pg_tblspc").mkdir()
        plant(pgdata)
        saved = await store.snapshot(f"db{n}", pgdata, {}, expect=None)
        with pytest.raises(UnsafeArchive, match="tablespace"):
            await store.restore(saved, tmp_path / f"out{n}")
    _small_tree(tmp_path / "clean", 3)
    (tmp_path / "clean" / "pg_tblspc").mkdir()
    (tmp_path / "clean" / "tablespace_map").write_text("")  # empty: no tablespace
    saved = await store.snapshot("db9", tmp_path / "clean", {}, expect=None)
    await store.restore(saved, tmp_path / "out9")


async def test_a_manifest_whose_parts_do_not_add_up_is_corrupt(tmp_path):
    _small_tree(tmp_path / "pgdata", 5)
    store = SnapshotStore(LocalDirBackend(tmp_path / "store"), tmp_path / "spool")
    saved = await store.snapshot("db", tmp_path / "pgdata", {}, expect=None)
    for listing in ({**saved.file_list, "count": 7}, {**saved.file_list, "parts": []},
                    {"count": 6, "parts": [{**saved.file_list["parts"][0], "count": 9}]},
                    {"count": 6}, {"count": 6, "parts": "x"}):
        with pytest.raises(CorruptArchive):
            await store.file_entries(dataclasses.replace(saved, file_list=listing))


async def test_retention_and_forks_carry_the_file_list(tmp_path):
    _small_tree(tmp_path / "pgdata", 5)
    backend = LocalDirBackend(tmp_path / "store")
    store = SnapshotStore(backend, tmp_path / "spool", keep_last=1)
    first = await store.snapshot("db", tmp_path / "pgdata", {})
    last = await store.snapshot("db", tmp_path / "pgdata", {})
    left = {o.key for o in await backend.list("dbs/db/versions/")}
    assert left == {last.archive["key"], f"dbs/db/versions/{last.version}.json",
                    *(p["key"] for p in last.file_list["parts"])}
    assert first.version not in str(left)

    forked = await fork_version(store, last, "copy")
    assert all(p["key"].startswith("dbs/copy/") for p in forked.file_list["parts"])
    await store.delete_database("db")  # the fork owns its objects
    cur = await store.current("copy")
    await store.restore(cur.manifest, tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(tmp_path / "pgdata")


# --- format 1: versions saved before the file list moved out of the manifest -----------------
FORMAT1 = Path(__file__).parent / "data" / "format1"
FORMAT1_FILES = {"PG_VERSION": b"15\n", "base/1/1259": bytes(range(256)) * 4,
                 "global/pg_control": b"control\x00" * 16}


async def _format1_store(tmp_path) -> SnapshotStore:
    """A store holding database old1 exactly as the code of format 1 saved it (the objects
    in tests/storage/data/format1 were written by it)."""
    backend = LocalDirBackend(tmp_path / "store")
    for path in FORMAT1.iterdir():
        key = ("dbs/old1/" if path.name == "current.json" else "dbs/old1/versions/") + path.name
        if path.suffix == ".zst":
            await backend.upload_file(key, path)
        else:
            await backend.put(key, path.read_bytes())
    return SnapshotStore(backend, tmp_path / "spool")


async def test_a_version_saved_in_format_1_restores(tmp_path):
    store = await _format1_store(tmp_path)
    cur = await store.current("old1")
    assert cur.manifest.format == 1 and cur.manifest.file_count == 3
    assert cur.manifest.role_map()["postgres"].verifier.startswith("SCRAM-SHA-256$4096:")
    await store.restore(cur.manifest, tmp_path / "out")
    assert _tree(tmp_path / "out") == FORMAT1_FILES
    assert (tmp_path / "out" / "pg_stat_tmp").is_dir()


async def test_a_fork_of_a_format_1_version_is_stored_in_the_current_format(tmp_path):
    store = await _format1_store(tmp_path)
    forked = await fork_version(store, (await store.current("old1")).manifest, "new")
    cur = await store.current("new")
    assert cur.manifest.format == forked.format == FORMAT and cur.manifest.file_count == 3
    assert "files" not in json.loads(await _manifest_bytes(store, cur.manifest))
    await store.restore(cur.manifest, tmp_path / "out")
    assert _tree(tmp_path / "out") == FORMAT1_FILES


async def _manifest_bytes(store: SnapshotStore, m) -> bytes:
    return (await store.backend.get(f"dbs/{m.db_id}/versions/{m.version}.json"))[0]
