"""Spare clones of the template: creating a database takes a ready copy with one rename;
without one it clones as before; spares never show as databases and are dropped on request."""

from __future__ import annotations

from storage.local import SPARE, LocalCatalog

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
