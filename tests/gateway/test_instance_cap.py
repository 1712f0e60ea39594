"""The instance cap and fencing in the instance manager, with fake Postgres processes (no
server, no storage service): a start takes a while, and the test counts how many run at once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway import errors
from gateway.app import open_databases
from gateway.compute import instances as instances_mod
from gateway.compute.dbroles import ADMIN
from gateway.config import Settings
from storage.local import LocalCatalog
from storage.localdir import LocalDirBackend
from storage.osuser import RunAs
from storage.roles import Role

SECURED = {ADMIN: Role(ADMIN, None, True, None, True), "postgres": Role("postgres", None, True, None, False)}


class FakeProcess:
    running = 0
    most = 0

    def __init__(self, bindir, pgdata, socket_dir, log_path, run_as, options) -> None:
        self.bindir, self.pgdata, self.socket_dir = bindir, pgdata, socket_dir
        self.socket_path, self.stopping, self.proc, self.pid, self.cgroup = socket_dir / "s", False, None, 1, None

    async def start(self, timeout: float) -> None:
        await asyncio.sleep(0.02)  # a postmaster coming up
        FakeProcess.running += 1
        FakeProcess.most = max(FakeProcess.most, FakeProcess.running)
        self.proc = _Proc()

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        await asyncio.sleep(0.02)
        FakeProcess.running -= 1
        self.proc.returncode = 0

    def kill_group(self) -> None:
        pass


class _Proc:
    returncode = None

    async def wait(self) -> int:
        while self.returncode is None:
            await asyncio.sleep(0.01)
        return self.returncode


class FakeReader:
    def __init__(self, *args, **kw) -> None:
        pass

    async def read(self):
        return SECURED

    async def close(self) -> None:
        pass


class FakeInstall:
    bindir = Path("/nonexistent")


@pytest.fixture
def manager(tmp_path, monkeypatch):
    FakeProcess.running = FakeProcess.most = 0
    monkeypatch.setattr(instances_mod, "PostgresProcess", FakeProcess)
    monkeypatch.setattr(instances_mod, "RoleReader", FakeReader)

    async def no_orphan(pgdata, timeout):
        return False
    monkeypatch.setattr(instances_mod, "stop_orphan", no_orphan)
    monkeypatch.setattr(instances_mod.extensions, "instance_options", lambda *a: {})
    settings = Settings(data_root=str(tmp_path / "data"), max_instances=2, lease_seconds=0,
                        wake_rate=0, socket_dir=str(tmp_path / "sock"))
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    m = instances_mod.InstanceManager(settings, open_databases(settings, catalog, LocalDirBackend(tmp_path / "store")))
    monkeypatch.setattr(m.installs, "for_pgdata", lambda pgdata: FakeInstall())

    async def no_control(inst):
        return None
    monkeypatch.setattr(m, "_control", no_control)
    for n in range(20):
        pgdata = catalog.db_dir(f"db{n}") / "pgdata"
        pgdata.mkdir(parents=True)
        (pgdata / "PG_VERSION").write_text("18\n")
        catalog.save_roles(f"db{n}", SECURED)
    return m


async def test_twenty_concurrent_cold_starts_never_run_more_than_the_cap(manager):
    async def client(n: int):
        inst = await manager.acquire(f"db{n}")
        await asyncio.sleep(0.01)
        manager.release(inst)

    results = await asyncio.gather(*(client(n) for n in range(20)), return_exceptions=True)
    assert FakeProcess.most <= 2, f"{FakeProcess.most} ran at once with max_instances = 2"
    for r in results:  # served, or told the cap is reached
        assert r is None or (isinstance(r, errors.GatewayError) and "too many databases" in r.message), r
    assert sum(r is None for r in results) >= 2


async def test_fencing_stops_every_instance_at_once_without_saving(manager, monkeypatch):
    for n in range(2):
        manager.release(await manager.acquire(f"db{n}"))
    saves = []

    async def save(db_id, note=""):
        saves.append(db_id)
    monkeypatch.setattr(manager.databases, "save", save)
    await manager.fence()
    assert manager.instances == {} and FakeProcess.running == 0
    assert saves == []
    assert all(manager.databases.state(f"db{n}").dirty for n in range(2))
