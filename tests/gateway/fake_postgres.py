"""A fake Postgres for unit tests of the lifecycle and the instance manager: processes that
take a moment to start and stop (counting how many run at once) and can be made to crash, a
role reader that answers secured roles, no pg_control. No server, no storage service."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.app import open_databases
from gateway.compute import instances as instances_mod
from gateway.compute import running as running_mod
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

    def crash(self) -> None:
        FakeProcess.running -= 1
        self.proc.returncode = -9

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

    async def read(self, names=None):
        return None, SECURED  # as dbroles.read_some_roles: every role

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass


class FakeInstall:
    bindir = Path("/nonexistent")


def fake_manager(tmp_path: Path, monkeypatch, *, databases: int = 20, backend=None,
                 **settings) -> instances_mod.InstanceManager:
    """An instance manager whose Postgres is FakeProcess, on `backend` (default: a local
    directory), with `databases` secured local copies db0, db1, ... (stopped, never saved)."""
    FakeProcess.running = FakeProcess.most = 0
    monkeypatch.setattr(running_mod, "PostgresProcess", FakeProcess)
    monkeypatch.setattr(running_mod, "RoleReader", FakeReader)

    async def no_orphan(pgdata, timeout):
        return False
    monkeypatch.setattr(running_mod, "stop_orphan", no_orphan)
    monkeypatch.setattr(running_mod.extensions, "instance_options", lambda *a: {})
    s = Settings(data_root=str(tmp_path / "data"), lease_seconds=0, wake_rate=0, durability="snapshot",
                 socket_dir=str(tmp_path / "sock"), **settings)
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    m = instances_mod.InstanceManager(s, open_databases(s, catalog, backend or LocalDirBackend(tmp_path / "store")))
    monkeypatch.setattr(m.installs, "for_pgdata", lambda pgdata: FakeInstall())

    async def no_control(inst):
        return None
    monkeypatch.setattr(m.launcher, "control", no_control)
    for n in range(databases):
        pgdata = catalog.db_dir(f"db{n}") / "pgdata"
        pgdata.mkdir(parents=True)
        (pgdata / "PG_VERSION").write_text("18\n")
        catalog.save_roles(f"db{n}", SECURED)
    return m
