"""Continuous WAL shipping and restore to a point (gateway/compute/walship.py, walrestore.py,
storage/wal.py) end to end: real Postgres 15 instances of the gateway's layout on private
sockets, the gateway's own WAL receiver, storage on moto (through a proxy that can cut it) or a local
directory. No gateway: these are the blocks the lifecycle will call."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from gateway.compute import dbroles, pgcontrol, walrestore, walship
from gateway.compute.postgres import PostgresProcess
from storage.errors import StorageError
from storage.local import copy_tree
from storage.localdir import LocalDirBackend
from storage.osuser import RunAs, clean_env
from storage.s3 import S3Backend
from storage.wal import WalConflict, WalGap, WalStore, parse_lsn

from ..conftest import PG_OPTIONS, reachable_tmpdir, template_catalog
from ..support.moto import ACCESS_KEY, REGION, SECRET_KEY
from ..support.pginstalls import install, installs

MAJOR = "15"
MAJORS = sorted(installs().by_major, key=int)  # each with its own pg_receivewal
RPO = 1.0
DB = "walt"
BASE = "20261203T000000.000Z-000000"  # the stored version the instances' WAL continues
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def templates():
    """The template data directory of a major, made once per module."""
    root = reachable_tmpdir("pgsni-walt-")
    catalog = template_catalog(root)
    yield catalog.template
    shutil.rmtree(root, ignore_errors=True)


class Instance:
    """One data directory of the gateway's layout (from the template) and its postmaster on a
    private socket, with the shipper's settings."""

    def __init__(self, root: Path, source: Path, major: str) -> None:
        self.root, self.pgdata = root, root / "pgdata"
        copy_tree(source, self.pgdata)
        self.bindir = install(major).bindir
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

    def store(self, backend) -> WalStore:
        """Where this instance's WAL is kept in `backend` (as its shipper writes it)."""
        return WalStore(backend, DB, base=BASE)

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
async def instances(templates):
    made: list[Instance] = []

    def make(source: Path | None = None, major: str = MAJOR) -> Instance:
        """A new instance from the template, or from a copy of a stopped one's data directory."""
        inst = Instance(reachable_tmpdir("pgsni-walp-"), source or templates(major), major)
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
    """A shipper of `inst`'s WAL, as durability.start_shipping makes one."""
    return walship.WalShipper(backend, DB, inst.socket_dir, inst.root / "spool", rpo_seconds=RPO,
                              base=BASE, halting=lambda: inst.process is not None and inst.process.stopping, **kw)


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
        if burst == 3:  # more than a segment, so that completed segments are shipped too;
            # the RPO holds while the shipper keeps up: a burst of WAL takes its upload time
            await inst.sql("INSERT INTO public.t SELECT g, repeat('x', 500) FROM generate_series(100000, 180000) g")
            burst_lsn = await commit(inst, 99999)
            print(f"a burst of 40 MB of WAL stored in {await stored_within(ship, burst_lsn, 30.0):.2f} s")
    last = await commit(inst, 999999)
    waited.append(await stored_within(ship, last, RPO + 1.0))
    print(f"seconds until in storage: max {max(waited):.2f}, each {[round(w, 2) for w in waited]}")
    assert max(waited) <= RPO
    assert ship.lag_bytes is not None and ship.upload_errors == 0, ship.last_error
    committed = await ids(inst)

    inst.kill()
    await ship.stop(timeout=10)
    shutil.rmtree(inst.pgdata)
    shutil.rmtree(inst.root / "spool")  # the whole machine is gone: only storage is left
    store = inst.store(s3_backend)
    listing = await store.listing()
    assert len(listing.segments) >= 2 and listing.superseded() == []  # each partial replaced its last
    await inst.restore(base, store)
    await inst.start()
    assert await ids(inst) == committed


async def started_with_table(inst: Instance) -> Path:
    """Start `inst` with an empty table t; returns the base copy taken before any row."""
    await inst.start()
    await inst.sql("CREATE TABLE public.t (id int PRIMARY KEY, pad text)")
    await inst.stop()
    base = inst.base()
    await inst.start()
    return base


@pytest.mark.parametrize("major", MAJORS)
async def test_restore_to_a_time_or_an_lsn_gives_exactly_what_was_committed_before(instances, local_backend, major):
    inst = instances(major=major)
    base = await started_with_table(inst)
    ship = shipper(inst, local_backend)
    await ship.start()
    await commit(inst, *range(1, 6))
    await asyncio.sleep(0.2)
    (target_time,), = await inst.sql("SELECT clock_timestamp()")
    await asyncio.sleep(0.2)
    target_lsn = await commit(inst, *range(6, 11))  # the end of row 10's commit
    last = await commit(inst, *range(11, 16))
    await stored_within(ship, last, 5.0)
    assert await ship.stop()
    await inst.stop()
    store = inst.store(local_backend)

    await inst.restore(base, store, target_time=target_time)
    await inst.start()
    assert await ids(inst) == list(range(1, 6))
    await inst.stop()

    await inst.restore(base, store, target_lsn=target_lsn)
    await inst.start()
    assert await ids(inst) == list(range(1, 11))
    await inst.stop()

    with pytest.raises(WalGap):  # past what storage holds: refused before Postgres starts
        await inst.restore(base, store, target_lsn=last + (64 << 20))


async def test_storage_down_the_spool_keeps_the_wal_and_catches_up(instances, s3_backend, s3_proxy):
    inst = instances()
    base = await started_with_table(inst)
    ship = shipper(inst, s3_backend, spool_budget=40 << 20)
    await ship.start()
    await stored_within(ship, await commit(inst, 1, 2, 3), 5.0)
    stored = ship.stored_lsn

    s3_proxy.cut()
    n = 1000
    for _ in range(3):  # about 60 MB of WAL: over the spool's budget
        await inst.sql("INSERT INTO public.t SELECT g, repeat('y', 500) FROM generate_series(%s, %s) g",
                       (n, n + 80000))
        await commit(inst, n + 90000)  # clients see no error
        n += 100000
    deadline = time.monotonic() + 30
    # a failed round is counted once its retries are over, which may be after the pause
    while not (ship.paused and ship.upload_errors) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert ship.paused, f"the receiver was not paused (spool {ship.spooled_bytes()} bytes)"
    # the budget counts WAL not in storage; the spool's files also hold WAL storage has: the
    # stored head of the segment being written, and a segment completed just before the cut,
    # stored in pieces and awaiting its upload as one object (up to a segment each); plus the
    # batch that crossed the budget (at most 8 MB) and what the connection had buffered.
    # Locally 46-48 MB; a fresh-clone CI run under load had 75.8 MB (a pause at 45.7 MB behind)
    assert ship.spooled_bytes() <= (40 << 20) + (48 << 20), ship.spooled_bytes()
    assert ship.stored_lsn == stored and ship.upload_errors > 0 and ship.last_error
    await asyncio.sleep(1.0)  # storage stays cut: the lag in seconds grows
    assert ship.lag_bytes > 40 << 20 and ship.lag_seconds > 1.0
    print(f"during the outage: lag {ship.lag_bytes >> 20} MiB, {ship.upload_errors} failed rounds, "
          f"spool {ship.spooled_bytes() >> 20} MiB")

    s3_proxy.restore()
    last = await commit(inst, 7)
    caught_up = await stored_within(ship, last, 60.0)
    print(f"caught up {caught_up:.1f} s after storage came back")
    for _ in range(50):  # the receiver resumes at its next round once the spool has room
        if not ship.paused:
            break
        await asyncio.sleep(0.1)
    assert not ship.paused
    committed = await ids(inst)
    await inst.stop()
    assert await ship.stop()
    shutil.rmtree(inst.pgdata)
    await inst.restore(base, inst.store(s3_backend))
    await inst.start()
    assert await ids(inst) == committed


async def test_async_takes_a_run_of_commits_in_few_batches_and_a_bulk_load_as_it_comes(instances, local_backend):
    """durability=async: the receiver lets WAL gather between batches (walreceiver.py
    gather_seconds) rather than waking for each commit, and still takes the WAL of a bulk load
    as fast as the instance writes it (lingering a fixed time per batch would cap it at the
    socket buffer per linger, a few MB/s)."""
    inst = instances()
    await started_with_table(inst)
    ship = shipper(inst, local_backend)
    await ship.start()
    await stored_within(ship, await commit(inst, 0), 5.0)
    receiver = ship.receiver
    before, n, began = receiver.batches, 300, time.monotonic()
    lsn = await commit(inst, *range(1, n + 1))
    took = time.monotonic() - began
    await stored_within(ship, lsn, RPO + 1.0)
    taken = receiver.batches - before
    print(f"{n} commits in {took:.2f} s taken in {taken} batches")
    # about one batch per linger (50 ms) while they come; one per commit without lingering
    assert taken <= took / (walship.LINGER / 2) + 5 and taken < n

    await inst.sql("INSERT INTO public.t SELECT g, repeat('x', 500) FROM generate_series(100000, 180000) g")
    end = parse_lsn((await inst.sql("SELECT pg_current_wal_flush_lsn()::text"))[0][0])
    written = time.monotonic()
    while (receiver.written or 0) < end:
        assert time.monotonic() - written < 5.0, (
            f"40 MB of WAL: the receiver is {(end - receiver.written) >> 20} MiB behind 5 s after it was written")
        await asyncio.sleep(0.02)
    print(f"the receiver had the bulk load's WAL {time.monotonic() - written:.2f} s after it was written")
    assert ship.receiver is receiver  # one stream throughout
    await inst.stop()
    assert await ship.stop()


async def test_a_second_history_under_the_same_name_is_refused(instances, local_backend):
    """Two copies of one database running at once (what leases prevent) ship to the same
    name: the second history's first completed segment is refused, nothing is overwritten."""
    first = instances()
    await started_with_table(first)
    await first.stop()
    second = instances(first.pgdata)
    await first.start()
    await second.start()
    ships = [shipper(first, local_backend), shipper(second, local_backend)]
    for ship in ships:
        await ship.start()
    await commit(first, 1, 2)
    (segment,), = await first.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    await first.sql("SELECT pg_switch_wal()")
    await stored_within(ships[0], await commit(first, 101), 5.0)
    await commit(second, 3, 4)
    await second.sql("SELECT pg_switch_wal()")
    deadline = time.monotonic() + 10
    while ships[1].failed is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert isinstance(ships[1].failed, WalConflict), ships[1].last_error
    store = first.store(local_backend)
    assert await store.read(store.segment_key(segment)) == (first.pgdata / "pg_wal" / segment).read_bytes()
    for ship in ships:
        await ship.stop(timeout=2)


async def test_tenants_gain_no_replication_rights(instances, local_backend, tmp_path):
    inst = instances()
    await inst.start()
    await inst.sql("ALTER ROLE postgres PASSWORD 'tenant-pw'")
    ship = shipper(inst, local_backend)
    await ship.start()
    tenant = f"host={inst.socket_dir} user=postgres password=tenant-pw dbname=postgres"

    def receive_as_tenant() -> subprocess.CompletedProcess:
        return subprocess.run([str(inst.bindir / "pg_receivewal"), "-d", tenant, "-D", str(tmp_path),
                               "--no-loop"], capture_output=True, text=True, env=clean_env(), timeout=30)

    refused = receive_as_tenant()
    assert refused.returncode != 0 and "no pg_hba.conf entry for replication connection" in refused.stderr
    await inst.sql("ALTER ROLE postgres REPLICATION")  # even with the attribute (it cannot get it)
    refused = receive_as_tenant()
    assert refused.returncode != 0 and "no pg_hba.conf entry for replication connection" in refused.stderr
    await inst.sql("ALTER ROLE postgres NOREPLICATION")

    async with await psycopg.AsyncConnection.connect(tenant, autocommit=True) as conn:
        assert (await (await conn.execute("SELECT rolreplication, rolsuper FROM pg_roles WHERE "
                                          "rolname = current_user")).fetchone()) == (False, False)
        for attempt in ("SELECT pg_drop_replication_slot('pgsni_walship')",
                        "SELECT pg_replication_slot_advance('pgsni_walship', '0/0')",
                        "SELECT pg_create_physical_replication_slot('mine', true)",
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_replication"):
            with pytest.raises(psycopg.Error) as e:
                await conn.execute(attempt)
            assert e.value.sqlstate == "42501", attempt
    await stored_within(ship, await commit_any(inst), 5.0)  # shipping goes on
    await ship.stop(timeout=5)


async def commit_any(inst: Instance) -> int:
    await inst.sql("CREATE TABLE IF NOT EXISTS public.t (id int PRIMARY KEY, pad text)")
    return await commit(inst, 1)


async def test_a_restored_database_ships_on_its_new_timeline(instances, local_backend):
    """After a restore to a point (promoted to timeline 2) the database runs on and ships
    again: its new WAL and the new timeline's history land beside the old timeline's, and
    the newest history is what a later restore follows, from the copy the replay left."""
    inst = instances()
    base = await started_with_table(inst)
    ship = shipper(inst, local_backend)
    await ship.start()
    target = await commit(inst, 1, 2, 3)
    await stored_within(ship, await commit(inst, 4, 5), 5.0)  # 4 and 5: the branch not taken
    await inst.stop()
    assert await ship.stop()
    store = inst.store(local_backend)
    await inst.restore(base, store, target_lsn=target)
    replayed = inst.base()  # the stopped, promoted copy: the new base the lifecycle would save

    await inst.start()
    ship = shipper(inst, local_backend)
    await ship.start()
    lsn, deadline = await commit(inst, 6, 7), time.monotonic() + 5.0
    # storage's newest WAL may be timeline 1's branch not taken, beyond `lsn` already: wait
    # for the shipper to have stored timeline 2's
    while not (ship.stored and ship.stored[0] == 2 and ship.stored[1] >= lsn):
        assert time.monotonic() < deadline, f"timeline 2's WAL up to {lsn:X} not stored: {ship.stored}"
        await asyncio.sleep(0.05)
    await inst.stop()
    assert await ship.stop()
    assert set((await store.listing()).histories) == {2}

    await inst.restore(replayed, store)
    await inst.start()
    assert await ids(inst) == [1, 2, 3, 6, 7]


async def test_an_instance_that_cannot_stream_is_refused_at_start(instances, local_backend):
    inst = instances()
    await inst.start({"wal_level": "minimal", "max_wal_senders": "0"})
    with pytest.raises(StorageError, match="wal_level=minimal"):
        await shipper(inst, local_backend).start()


async def replication_positions(inst: Instance) -> tuple[int, int]:
    """(write, flush) the instance last heard from the gateway's receiver; 0 for a position
    not reported (yet): pg_stat_replication shows it as NULL, e.g. the flush position while
    storage holds nothing of this stream, or before the receiver's first status message."""
    (write, flush), = await inst.sql("SELECT write_lsn::text, flush_lsn::text FROM pg_stat_replication "
                                     "WHERE application_name = %s", (walship.APP,))
    return parse_lsn(write) if write else 0, parse_lsn(flush) if flush else 0


async def test_the_instance_keeps_the_wal_storage_does_not_hold(instances, s3_backend, s3_proxy):
    """durability=async: the receiver writes ahead, but reports flushed (and so moves the slot
    that keeps WAL in Postgres) only as far as storage holds: whatever the unsynced spool
    could lose, the instance still has."""
    inst = instances()
    await started_with_table(inst)
    ship = shipper(inst, s3_backend)
    await ship.start()
    await stored_within(ship, await commit(inst, 1), 5.0)
    s3_proxy.cut()
    last = await commit(inst, *range(2, 40))
    deadline = time.monotonic() + 10
    while (await replication_positions(inst))[0] < last and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    write, flush = await replication_positions(inst)
    print(f"storage cut: write {write:X}, flush {flush:X}, stored {ship.stored_lsn:X}")
    assert write >= last and flush <= ship.stored_lsn < last
    s3_proxy.restore()
    await stored_within(ship, last, 30.0)
    deadline = time.monotonic() + 10
    while (await replication_positions(inst))[1] < last and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (await replication_positions(inst))[1] >= last  # the slot moves on once it is stored
    await inst.stop()
    assert await ship.stop()


async def shipping_then_cut(instances, backend, proxy) -> tuple[Instance, Path, walship.WalShipper]:
    """A new instance with a table (and its base copy) whose shipper has stored row 1, then
    storage cut off."""
    inst = instances()
    base = await started_with_table(inst)
    ship = shipper(inst, backend)
    await ship.start()
    await stored_within(ship, await commit(inst, 1), 5.0)
    proxy.cut()
    return inst, base, ship


async def shipped_to_the_end(inst: Instance, ship: walship.WalShipper) -> None:
    """Start `ship`, wait until storage holds all the WAL the instance has flushed, then stop
    the instance and the shipper, which must find nothing left to upload."""
    await ship.start()
    (flushed,), = await inst.sql("SELECT pg_current_wal_flush_lsn()::text")
    await stored_within(ship, parse_lsn(flushed), 30.0)
    await inst.stop()
    assert await ship.stop()


async def killed_leaving_a_torn_part(instances, backend, proxy) -> tuple[Instance, Path, walship.WalShipper, Path]:
    """Ship row 1, cut storage, commit rows 2..199, then the machine loses power (postmaster and
    gateway at once) and restarts: the receiver's newest spool file is left as a `.part` whose
    second half the page cache never wrote out (zeros), under another boot id. Storage is
    back. Returns the instance (stopped), its base copy, the dead shipper and that file."""
    inst, base, ship = await shipping_then_cut(instances, backend, proxy)
    await commit(inst, *range(2, 200))
    await inst.sql("CHECKPOINT")  # the slot's position is saved as the instance last heard it
    await asyncio.sleep(0.5)
    inst.kill()
    await ship.stop(timeout=0.1)
    spool = ship.spool
    newest = max((p for p in spool.iterdir() if walship.parse_part_name(p.name)),
                 key=lambda p: walship.parse_part_name(p.name)[:2])
    left = newest.with_name(newest.name.rsplit(".", 1)[0] + ".part")  # as the dead receiver left it
    newest.rename(left)
    size = left.stat().st_size
    with open(left, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    (spool / ".boot_id").write_text("a boot before this one\n")
    proxy.restore()
    return inst, base, ship, left


async def test_a_spool_file_left_before_a_machine_restart_is_streamed_again(instances, s3_backend, s3_proxy):
    """A `.part` file a dead process left, when the machine restarted since (another boot id):
    the page cache is gone, so its tail may be zeros. It is deleted and the instance streams
    that WAL again (it kept it: nothing past storage was reported flushed); uploading the
    file as it is would store the zeros as WAL and lose the commits after them."""
    inst, base, _, left = await killed_leaving_a_torn_part(instances, s3_backend, s3_proxy)
    await inst.start()
    committed = await ids(inst)
    assert len(committed) == 199
    ship = shipper(inst, s3_backend)
    await shipped_to_the_end(inst, ship)
    assert not left.exists()
    shutil.rmtree(inst.pgdata)
    await inst.restore(base, inst.store(s3_backend))
    await inst.start()
    assert await ids(inst) == committed


async def test_a_spool_file_left_before_a_machine_restart_under_an_older_version_is_not_uploaded(
        instances, s3_backend, s3_proxy):
    """The same `.part` (its tail zeros after the restart), in the spool of a version the copy
    has moved on from (saved as a new version before its next run): nobody streams that WAL
    again, and uploading it as it is stores the zeros as that version's WAL (a restore to a
    point in it would stop there without a word). It is deleted, as in the current spool: that
    WAL is then missing, which a restore into that span reports."""
    inst, _, dead, left = await killed_leaving_a_torn_part(instances, s3_backend, s3_proxy)
    old_prefix = dead.store.prefix
    before = {o.key for o in await s3_backend.list(old_prefix)}
    await inst.start()
    ship = walship.WalShipper(s3_backend, DB, inst.socket_dir, inst.root / "spool", rpo_seconds=RPO,
                              base="20261204T000000.000Z-111111")  # the version saved since
    await shipped_to_the_end(inst, ship)
    assert not left.exists()
    added = {o.key for o in await s3_backend.list(old_prefix)} - before
    assert not added, f"the left-over file was uploaded: {sorted(added)}"


async def test_storage_down_an_instance_still_stops_at_once(instances, s3_backend, s3_proxy):
    """durability=async with storage down: a fast shutdown ends in moments and leaves a clean
    copy; the WAL storage lacks stays in the spool (and in the instance: the slot did not
    move) for the next run. Postgres' walsender ends a stream at shutdown only once its
    standby reports flushed all it sent, and this receiver reports only what storage holds."""
    inst, base, ship = await shipping_then_cut(instances, s3_backend, s3_proxy)
    await commit(inst, *range(2, 20))
    await asyncio.sleep(0.5)  # the receiver has it all in the spool
    began = time.monotonic()
    await inst.process.stop(10.0)  # SIGQUIT (a crash, as the copy sees it) after 10 s
    took = time.monotonic() - began
    assert not await ship.stop(timeout=1.0)  # storage is down: the spool keeps the rest
    print(f"the fast shutdown took {took:.1f} s with storage down")
    assert took < 5.0
    assert pgcontrol.read(inst.bindir, inst.pgdata, inst.run_as).shut_down

    s3_proxy.restore()
    await inst.start()
    committed = await ids(inst)
    ship = shipper(inst, s3_backend)
    await shipped_to_the_end(inst, ship)
    shutil.rmtree(inst.pgdata)
    await inst.restore(base, inst.store(s3_backend))
    await inst.start()
    assert await ids(inst) == committed == list(range(1, 20))


async def write_past_the_slot(inst: Instance) -> None:
    """About 40 MB of WAL with checkpoints: more than a slot limited to 1 MB keeps, so
    Postgres removes what the receiver has not reported flushed."""
    for n in range(3):
        await inst.sql("INSERT INTO public.t SELECT g, repeat('y', 500) FROM generate_series(%s::int, %s::int) g",
                       (1000 + n * 30000, 1000 + n * 30000 + 25000))
        await inst.sql("CHECKPOINT")


@pytest.mark.parametrize("major", MAJORS)
async def test_shipping_goes_on_after_the_instance_dropped_wal_storage_lacked(instances, s3_backend, s3_proxy, major):
    """Storage down for longer than wal_keep_mb of WAL: Postgres invalidates the slot (and
    drops that WAL, which the spool has but a lost node would not). Once storage is back,
    shipping goes on."""
    inst = instances(major=major)
    inst.options["max_slot_wal_keep_size"] = "1MB"
    await started_with_table(inst)
    ship = shipper(inst, s3_backend)
    await ship.start()
    await stored_within(ship, await commit(inst, 1), 5.0)
    s3_proxy.cut()
    await write_past_the_slot(inst)
    (status,), = await inst.sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (walship.SLOT,))
    print(f"slot: {status}")
    s3_proxy.restore()
    last = await commit(inst, 2)
    await stored_within(ship, last, 30.0)
    await inst.stop()
    assert await ship.stop()


async def test_wal_removed_before_storage_held_it_is_counted(instances, s3_backend, s3_proxy):
    """Storage down, the spool over its budget (receiver paused) and more WAL written than
    the slot may keep: Postgres removes WAL storage never got. That loss is logged and counted
    (the metric pgsni_wal_lost_bytes, `lost_bytes` in db info), and shipping goes on after it."""
    inst = instances()
    inst.options["max_slot_wal_keep_size"] = "1MB"
    await started_with_table(inst)
    events = []
    ship = shipper(inst, s3_backend, spool_budget=4 << 20, count=lambda e, n: events.append((e, n)))
    await ship.start()
    await stored_within(ship, await commit(inst, 1), 5.0)
    s3_proxy.cut()
    await write_past_the_slot(inst)
    deadline = time.monotonic() + 10  # once the receiver has taken in more than the budget
    while not ship.paused and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert ship.paused
    s3_proxy.restore()
    last = await commit(inst, 2)
    await stored_within(ship, last, 60.0)
    lost = [n for e, n in events if e == "lost_bytes"]
    print(f"lost to shipping: {ship.lost_bytes >> 20} MiB")
    assert ship.lost_bytes > 0 and sum(lost) == ship.lost_bytes
    await inst.stop()
    assert await ship.stop()
