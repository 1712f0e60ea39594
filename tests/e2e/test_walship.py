"""Continuous WAL shipping and restore to a point (gateway/compute/walship.py, walrestore.py,
storage/wal.py) end to end: real Postgres 15 instances of the gateway's layout on private
sockets, a real pg_receivewal, storage on moto (through a proxy that can cut it) or a local
directory. No gateway: these are the blocks the lifecycle will call."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from gateway.compute import dbroles, walrestore, walship
from gateway.compute.pgbins import PgInstalls
from gateway.compute.postgres import PostgresProcess
from storage.local import copy_tree
from storage.localdir import LocalDirBackend
from storage.osuser import RunAs, clean_env
from storage.s3 import S3Backend
from storage.wal import WalConflict, WalStore, parse_lsn

from ..conftest import PG_OPTIONS, pg_bindir, reachable_tmpdir, template_catalog
from ..support.moto import ACCESS_KEY, REGION, SECRET_KEY

MAJOR = "15"
RPO = 1.0
DB = "walt"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def template15():
    root = reachable_tmpdir("pgsni-walt-")
    yield template_catalog(root).template(MAJOR)
    shutil.rmtree(root, ignore_errors=True)


class Instance:
    """One Postgres 15 data directory of the gateway's layout (from the template) and its
    postmaster on a private socket, with the shipper's settings."""

    def __init__(self, root: Path, template: Path) -> None:
        self.root, self.pgdata = root, root / "pgdata"
        copy_tree(template, self.pgdata)
        self.bindir = PgInstalls(pg_bindir()).get(MAJOR).bindir
        self.run_as = RunAs.resolve("postgres")
        self.socket_dir = Path(f"/tmp/pgsni-w-{secrets.token_hex(4)}")
        self.options = {**PG_OPTIONS, **walship.instance_options()}
        self.process: PostgresProcess | None = None

    async def start(self, extra: dict[str, str] | None = None) -> None:
        self.process = PostgresProcess(self.bindir, self.pgdata, self.socket_dir, self.root / "pg.log",
                                       self.run_as, {**self.options, **(extra or {})})
        await self.process.start(60.0)

    async def stop(self) -> None:
        await self.process.stop(30.0)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once: a lost machine, as Postgres sees it."""
        os.killpg(self.process.pid, signal.SIGKILL)

    async def sql(self, query: str, params=None):
        async with await dbroles.connect(self.socket_dir) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else None

    def base(self) -> Path:
        """A copy of the stopped data directory, as a snapshot holds it."""
        base = self.root / f"base-{secrets.token_hex(3)}"
        copy_tree(self.pgdata, base)
        return base

    async def restore(self, base: Path, store: WalStore, **target) -> None:
        """Replace the data directory by `base` plus the stored WAL up to `target`, replayed."""
        shutil.rmtree(self.pgdata, ignore_errors=True)
        copy_tree(base, self.pgdata)
        recovery = await walrestore.prepare(self.pgdata, store, self.root / "restore-wal", self.bindir,
                                            self.run_as, **target)
        await walrestore.replay(recovery, self.bindir, self.pgdata, self.socket_dir,
                                self.root / "pg.log", self.run_as, self.options)


@pytest.fixture
async def instances(template15):
    made: list[Instance] = []

    def make() -> Instance:
        inst = Instance(reachable_tmpdir("pgsni-walp-"), template15)
        made.append(inst)
        return inst
    yield make
    for inst in made:
        if inst.process is not None:
            await inst.process.stop(5.0)
        shutil.rmtree(inst.root, ignore_errors=True)
        shutil.rmtree(inst.socket_dir, ignore_errors=True)


@pytest.fixture
def local_backend(tmp_path):
    return LocalDirBackend(tmp_path / "store", "pfx")


@pytest.fixture
async def s3_backend(moto_server, s3_proxy):
    b = S3Backend(moto_server.create_bucket(), "pfx", endpoint_url=s3_proxy.url, region=REGION,
                  access_key=ACCESS_KEY, secret_key=SECRET_KEY, attempts=2, timeout=2)
    yield b
    await b.close()


def shipper(inst: Instance, backend, **kw) -> walship.WalShipper:
    return walship.WalShipper(backend, DB, inst.bindir, inst.socket_dir, inst.root / "spool",
                              rpo_seconds=RPO, **kw)


async def commit(inst: Instance, *ids: int) -> int:
    """Insert rows `ids`, one autocommit transaction each; the WAL position after the last."""
    async with await dbroles.connect(inst.socket_dir) as conn:
        for i in ids:
            await conn.execute("INSERT INTO public.t (id) VALUES (%s)", (i,))
        return parse_lsn((await (await conn.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone())[0])


async def stored_within(ship: walship.WalShipper, lsn: int, seconds: float) -> float:
    """Seconds until storage itself (not the shipper's counter) holds WAL up to `lsn`."""
    started = time.monotonic()
    while True:
        newest = await ship.store.newest()
        if newest is not None and newest[1] >= lsn:
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            raise AssertionError(f"WAL up to {lsn:X} not in storage after {seconds} s "
                                 f"(stored {newest}, shipper: {ship.last_error})")
        await asyncio.sleep(0.05)


async def ids(inst: Instance) -> list[int]:
    return [r[0] for r in await inst.sql("SELECT id FROM public.t ORDER BY id")]


async def test_commits_reach_storage_within_the_rpo_and_survive_losing_the_instance(instances, s3_backend):
    inst = instances()
    await inst.start()
    await inst.sql("CREATE TABLE public.t (id int PRIMARY KEY, pad text)")
    await inst.stop()
    base = inst.base()  # the snapshot taken before the writes
    await inst.start()
    ship = shipper(inst, s3_backend)
    await ship.start()
    spool = os.stat(inst.root / "spool")
    assert spool.st_uid == os.geteuid() and spool.st_mode & 0o077 == 0  # not the instance's to read

    waited, n = [], 0
    for burst in range(8):
        lsn = await commit(inst, *range(n, n + 5))
        n += 5
        waited.append(await stored_within(ship, lsn, RPO + 1.0))
        if burst == 3:  # more than a segment, so that completed segments are shipped too
            await inst.sql("INSERT INTO public.t SELECT g, repeat('x', 500) FROM generate_series(100000, 180000) g")
    last = await commit(inst, 999999)
    waited.append(await stored_within(ship, last, RPO + 1.0))
    print(f"seconds until in storage: max {max(waited):.2f}, each {[round(w, 2) for w in waited]}")
    assert max(waited) <= RPO
    assert ship.lag_bytes is not None and ship.upload_errors == 0
    committed = await ids(inst)

    inst.kill()
    await ship.stop(timeout=10)
    shutil.rmtree(inst.pgdata)
    shutil.rmtree(inst.root / "spool")  # the whole machine is gone: only storage is left
    store = WalStore(s3_backend, DB)
    listing = await store.listing()
    assert len(listing.segments) >= 2 and listing.superseded() == []  # each partial replaced its last
    await inst.restore(base, store)
    await inst.start()
    assert await ids(inst) == committed
