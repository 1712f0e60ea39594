"""What `db info` calls a database's state (gateway/compute/lifecycle.py), read from the local
copy, storage and the set-aside copies, without a running Postgres."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.app import open_databases
from gateway.compute.instances import InstanceManager
from gateway.compute.lifecycle import State
from gateway.config import Settings
from storage.local import LocalCatalog
from storage.localdir import LocalDirBackend
from storage.osuser import RunAs


def _manager(tmp_path: Path) -> InstanceManager:
    settings = Settings(data_root=str(tmp_path / "data"))
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    return InstanceManager(settings, open_databases(settings, catalog, LocalDirBackend(tmp_path / "store")))


async def test_states_of_a_stopped_database(tmp_path):
    m = _manager(tmp_path)
    assert await m.database("x").state() is State.ABSENT
    src = tmp_path / "src" / "pgdata"
    src.mkdir(parents=True)
    (src / "PG_VERSION").write_text("18\n")
    manifest = await m.databases.store.snapshot("x", src, {}, expect=None)
    assert await m.database("x").state() is State.STORED
    await m.databases.install("x", manifest)
    assert await m.database("x").state() is State.LOCAL
    m.databases.mark_running("x")
    m.databases.mark_stopped("x", changed=True)
    assert await m.database("x").state() is State.CHANGED
    m.databases.set_aside("x")
    assert await m.database("x").state() is State.CONFLICT  # until the operator deals with the copy
    m.shared.starting.add("y")
    assert await m.database("y").state() is State.STARTING
