"""Spare clones of the template: creating a database takes a ready copy with one rename;
without one it clones as before; spares never show as databases and are dropped on request."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from storage import local as local_mod
from storage.errors import CopyError, DiskFull, StorageError
from storage.local import SPARE, DatabaseExists, LocalCatalog, copy_tree
from storage.osuser import clean_env

from ..conftest import template_catalog


def _catalog(root) -> LocalCatalog:
    return template_catalog(root)


def test_create_takes_a_spare_then_clones(data_root):
    catalog = _catalog(data_root)
    assert catalog.fill_spares(1) == 1
    assert catalog.fill_spares(1) == 0  # already one waiting
    (spare,) = [p for p in data_root.iterdir() if p.name.startswith(SPARE)]
    marker = spare / "pgdata" / "spare-marker"
    marker.write_text("x")
    pgdata = catalog.create("app1")
    assert (pgdata / "spare-marker").exists() and (pgdata / "PG_VERSION").is_file()
    assert not spare.exists()
    pgdata2 = catalog.create("app2")  # no spare left: a plain clone
    assert (pgdata2 / "PG_VERSION").is_file() and not (pgdata2 / "spare-marker").exists()
    assert pgdata2.stat().st_mode & 0o077 == 0 and (pgdata2.stat().st_uid == pgdata.stat().st_uid)
    assert catalog.list() == ["app1", "app2"]


def test_a_spare_is_synced_when_made_so_taking_it_syncs_only_the_data_root(data_root, monkeypatch):
    """The durability work is the filler's: a spare's files are synced before it is ready,
    and a create that takes it renames it and syncs the data root, nothing more."""
    catalog = _catalog(data_root)
    calls: list[tuple[str, Path]] = []
    monkeypatch.setattr(local_mod, "sync_tree", lambda p: calls.append(("sync_tree", Path(p))))
    monkeypatch.setattr(local_mod, "fsync_dir", lambda p: calls.append(("fsync_dir", Path(p))))
    assert catalog.fill_spares(1) == 1
    (spare,) = [p for p in data_root.iterdir() if p.name.startswith(SPARE)]
    token = spare.name.rsplit("-", 1)[1]
    assert calls == [("sync_tree", data_root / f"{SPARE}tmp-{token}"), ("fsync_dir", data_root)]
    calls.clear()
    pgdata = catalog.create("app1")
    assert calls == [("fsync_dir", data_root)]
    assert (pgdata / "PG_VERSION").is_file() and not spare.exists()


def test_a_spare_never_takes_the_place_of_an_existing_database(data_root):
    catalog = _catalog(data_root)
    catalog.fill_spares(1)
    catalog.db_dir("app1").mkdir()  # even an empty directory, which a rename would replace
    with pytest.raises(DatabaseExists, match='database "app1" already exists'):
        catalog.create("app1")
    assert len([p for p in data_root.iterdir() if p.name.startswith(SPARE)]) == 1


def test_drop_spares_removes_ready_and_half_made(data_root):
    catalog = _catalog(data_root)
    catalog.fill_spares(2)
    (data_root / f"{SPARE}tmp-dead").mkdir()  # left by a gateway killed mid-copy
    assert catalog.list() == []
    catalog.drop_spares()
    assert not [p for p in data_root.iterdir() if p.name.startswith(SPARE)]


def test_a_damaged_spare_is_not_used(data_root):
    catalog = _catalog(data_root)
    catalog.fill_spares(1)
    (spare,) = [p for p in data_root.iterdir() if p.name.startswith(SPARE)]
    (spare / "pgdata" / "global" / "pg_control").unlink()
    pgdata = catalog.create("app1")
    assert (pgdata / "global" / "pg_control").is_file()


# --- copy_tree: the one `cp -a` of a data directory (create, spares, db upload, db upgrade) ---
def test_copy_tree_keeps_modes_and_names_what_failed(tmp_path):
    src = tmp_path / "src"
    src.mkdir(mode=0o700)
    (src / "f").write_text("x")
    (src / "f").chmod(0o600)
    copy_tree(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "x"
    assert (tmp_path / "dst").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "dst" / "f").stat().st_mode & 0o777 == 0o600
    with pytest.raises(CopyError) as e:
        copy_tree(tmp_path / "missing", tmp_path / "dst2")
    assert "missing" in str(e.value) and not e.value.disk_full and str(e.value) in e.value.stderr


def test_copy_tree_runs_cp_with_a_clean_environment(tmp_path, monkeypatch):
    seen = {}

    def fake_run(argv, **kw):
        seen.update(argv=argv, env=kw["env"])
        return subprocess.CompletedProcess(argv, 1, "", "cp: a\ncp: write error: No space left on device\n")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-pass")
    monkeypatch.setattr(local_mod.subprocess, "run", fake_run)
    with pytest.raises(CopyError) as e:
        copy_tree(tmp_path / "a", tmp_path / "b")
    assert seen["argv"][:3] == ["cp", "-a", "--reflink=auto"] and seen["env"] == clean_env()
    assert e.value.disk_full and str(e.value) == "cp: write error: No space left on device"


def _failing(error: CopyError):
    def copy(src, dst):
        raise error
    return copy


def test_create_reports_a_full_disk_and_other_copy_failures(data_root, monkeypatch):
    catalog = _catalog(data_root)
    monkeypatch.setattr(local_mod, "copy_tree", _failing(
        CopyError("cp: x: No space left on device", "cp: x: No space left on device", disk_full=True)))
    with pytest.raises(DiskFull, match='no space left on the data root for creating database "app1"'):
        catalog.create("app1")
    monkeypatch.setattr(local_mod, "copy_tree", _failing(CopyError("cp: x: Permission denied")))
    with pytest.raises(StorageError, match='cannot create database "app1": cp: x: Permission denied'):
        catalog.create("app1")
    assert catalog.list() == []
