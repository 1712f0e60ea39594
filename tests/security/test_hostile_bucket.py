"""A tampered bucket (SECURITY.md: "trusted to keep what it is given, but not to be intact: a
damaged or tampered archive ... must not write outside its target"): what the gateway reads
from storage must not steer it outside its own directories, nor take down more than the one
database whose objects were tampered with.

Each test fails before its fix: it says what the tampered object did."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import zstandard

from gateway.compute import durability
from gateway.compute.pitr import segment_size
from gateway.config import Settings
from storage.cache import Databases
from storage.errors import StorageError
from storage.heartbeats import Heartbeat, live_gateways
from storage.local import LocalCatalog
from storage.localdir import LocalDirBackend
from storage.osuser import RunAs
from storage.snapshots import SnapshotStore
from storage.wal import WalStore

from ..conftest import reachable_tmpdir
from ..support.harness import conninfo, psql
from ..support.pginstalls import install


def _databases(tmp_path: Path) -> Databases:
    catalog = LocalCatalog(tmp_path / "data", RunAs(os.geteuid(), os.getegid(), "me"))
    catalog.prepare()
    store = SnapshotStore(LocalDirBackend(tmp_path / "store"), tmp_path / "spool")
    return Databases(catalog, store)


async def _stored(tmp_path: Path, databases: Databases, db_id: str):
    src = tmp_path / f"src-{db_id}" / "pgdata"
    (src / "global").mkdir(parents=True)
    (src / "PG_VERSION").write_text("18\n")
    (src / "global" / "pg_control").write_bytes(os.urandom(512))
    return await databases.store.snapshot(db_id, src, {}, expect=None)


# --- a manifest's base_backup["wal"] becomes a local spool directory --------------------------

@pytest.mark.parametrize("wal", ["ABSOLUTE", "../../../victim"])
async def test_a_manifests_wal_prefix_does_not_make_or_chmod_directories_outside_the_spools(tmp_path, wal):
    """A version's manifest names the WAL prefix a base backup continues (`base_backup.wal`),
    which the restored copy records as its WAL prefix and the WAL shipper then joins onto
    `<data_root>/.wal/<id>/` as its spool directory. Storage checks the prefix only when it
    builds a WalStore, after the shipper has made and chmodded the directory. A copy that was
    not shut down cleanly (a crash copy, which snapshots of a recovered copy are) skips the
    replay that would have built the WalStore first, so on a gateway with durability=async
    a tampered manifest made the gateway (root) mkdir and chmod 0700 any directory: `/`,
    `/usr`, or the data root that Postgres (another uid) must traverse."""
    databases = _databases(tmp_path)
    manifest = await _stored(tmp_path, databases, "app")
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(victim, 0o755)
    (victim / "inside.part").write_text("someone's file")
    hostile = str(victim) if wal == "ABSOLUTE" else wal
    key = f"dbs/app/versions/{manifest.version}.json"
    raw = json.loads((await databases.store.backend.get(key))[0])
    raw["format"] = 3
    raw["base_backup"] = {"wal": hostile, "timeline": 1, "start_lsn": "0/2000028",
                          "end_lsn": "0/2000100", "checkpoint_lsn": "0/2000060", "segment_size": 16 << 20}
    await databases.store.backend.put(key, json.dumps(raw).encode())

    settings = Settings(durability="async")
    try:
        cur = await databases.current("app", fresh=True)
        await databases.install("app", cur.manifest)
        # what the lifecycle's `_base()` gives durability.start_shipping after the launch
        base = databases.state("app").wal_prefix
        inst = SimpleNamespace(db_id="app", socket_dir=tmp_path / "no-socket",
                               process=SimpleNamespace(stopping=False), shipper=None)
        await durability.start_shipping(inst, settings, databases.store.backend,
                                        databases.catalog.root, base)
    except (StorageError, OSError, psycopg.Error):
        pass  # refused (or no instance to stream from): what matters is what it did before
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755, \
        f"the tampered manifest made the gateway chmod {victim} (outside <data_root>/.wal)"
    assert sorted(p.name for p in victim.iterdir()) == ["inside.part"]


# --- WAL objects are read whole into memory, whatever their size ------------------------------

@pytest.mark.parametrize("name", ["00000002.history", "000000010000000000000001.zst"])
async def test_a_huge_wal_object_is_refused_without_being_read_into_memory(tmp_path, name):
    """`WalStore.read` joins a whole download (a history file, or a segment's compressed
    bytes before `max_output_size` is applied) in memory. Manifests, pointers, leases and file
    list parts are refused above MAX_SMALL_OBJECT (16 MiB); a WAL object planted in the
    bucket has no bound, so a restore or fork of that one database made the gateway process
    (every tenant's) allocate twice the object's size: gigabytes end it by the OOM killer."""
    backend = LocalDirBackend(tmp_path / "store")
    store = WalStore(backend, "app", base="v1")
    path = tmp_path / "store" / "dbs" / "app" / "wal" / "v1" / name
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(256 << 20)  # sparse: 256 MiB of zeros
    if name.endswith(".history"):
        read = lambda: store.history(2)  # noqa: E731
    else:
        (tmp_path / "dest").mkdir()
        read = lambda: store.fetch(tmp_path / "dest", start_lsn=16 << 20)  # noqa: E731
    raised: BaseException | None = None
    tracemalloc.start()
    try:
        try:
            await read()
        except Exception as e:  # noqa: BLE001  (judged below)
            raised = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"reading a 256 MiB WAL object took {peak >> 20} MiB of the gateway's memory"
    assert isinstance(raised, StorageError), f"a 256 MiB WAL object {name} was not refused: {raised!r}"


# --- heartbeats: a forged one must not break every reader ----------------------------------------

@pytest.mark.parametrize("forged", [b'{"holder": "x", "expires": 1' + b"0" * 400 + b"}",
                                    b"[" * 100_000], ids=["huge-expiry", "deep-nesting"])
async def test_a_forged_heartbeat_is_left_out_not_raised(tmp_path, forged):
    """heartbeats.py: "Damaged heartbeats ... are left out". `Heartbeat.decode` turns only
    KeyError/TypeError/AttributeError (and json's ValueError) into "damaged"; an expiry
    that float() cannot hold raises OverflowError and deep nesting RecursionError, which went
    through `live_gateways` (every peer lookup of every gateway: forwarding clients to the
    holders of their databases, relaying cancels) and through a lease takeover's check of
    the holder's heartbeat."""
    backend = LocalDirBackend(tmp_path / "store")
    now = time.time()
    await backend.put("gateways/good.json", Heartbeat("good", now + 60, 30.0, "10.0.0.1:5433").encode())
    await backend.put("gateways/forged.json", forged)
    live = await live_gateways(backend, now)
    assert [b.holder for b in live] == ["good"]


def test_a_tampered_version_does_not_chmod_outside_the_data_root_end_to_end(start_gateway, tls, tmp_path):
    """The same through a real gateway with default settings (durability=async, local
    storage): a version whose archive holds a crash copy (pg_control "in production", as a
    copy saved after a gateway died holds) and whose manifest says it is a base backup
    continuing WAL prefix `<victim>` (an absolute path). A client's login restores it, the
    replay check is skipped (not shut down cleanly: crash recovery replays it), Postgres
    starts, and the WAL shipper made `<victim>` its spool: mkdir and chmod 0700 as root."""
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(victim, 0o755)

    gt = start_gateway()
    gt.create_db("app1")
    gt.stop()
    settings = gt.settings
    pgdata = settings.data_path / "app1" / "pgdata"

    # a crash copy of the database: started on a private socket and stopped immediately
    crash = reachable_tmpdir("pgsni-crash-")
    shutil.copytree(pgdata, crash / "pgdata", symlinks=True)
    sock = crash / "sock"
    sock.mkdir()
    st = os.stat(pgdata)
    for p in [sock, crash / "pgdata", *(crash / "pgdata").rglob("*")]:
        os.lchown(p, st.st_uid, st.st_gid)
    os.chmod(crash / "pgdata", 0o700)
    bindir = install().bindir
    run = dict(user=st.st_uid, group=st.st_gid, extra_groups=[], capture_output=True, text=True, timeout=120,
               env={"PATH": "/usr/bin:/bin"})
    started = subprocess.run([str(bindir / "pg_ctl"), "-D", str(crash / "pgdata"), "-w", "-l", str(sock / "log"), "-o",
                              f"-c listen_addresses='' -k {sock} -c archive_mode=off", "start"], **run)
    assert started.returncode == 0, started.stdout + started.stderr
    stopped = subprocess.run([str(bindir / "pg_ctl"), "-D", str(crash / "pgdata"), "-m", "immediate", "stop"], **run)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    async def tamper() -> None:
        backend = LocalDirBackend(settings.storage_path)
        store = SnapshotStore(backend, tmp_path / "spool")
        cur = await store.current("app1")
        forged = await store.snapshot("app1", crash / "pgdata", cur.manifest.role_map(), expect=cur,
                                      make_current=False,
                                      base_backup={"wal": str(victim), "timeline": 1, "start_lsn": "0/2000028",
                                                   "end_lsn": "0/2000100", "checkpoint_lsn": "0/2000060",
                                                   "segment_size": 16 << 20})
        await store._point("app1", forged.version, cur)

    asyncio.run(tamper())
    shutil.rmtree(settings.data_path / "app1")  # this machine restores it from storage
    gt = start_gateway()
    try:
        psql(conninfo(gt.port, tls["ca"], "app1"), "select 1")
    finally:
        shutil.rmtree(crash, ignore_errors=True)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755, \
        f"a tampered version made the gateway chmod {victim}, outside its data root, to 0700"


async def test_a_wal_object_that_inflates_hugely_is_not_inflated_to_read_its_header(tmp_path):
    """`pitr.segment_size` (a restore or fork to an LSN asks it of the first stored WAL object
    of each version) wants 36 bytes of a segment's page header, but hands each downloaded
    chunk whole to a zstd decompressobj, which inflates all of it: a 32 KiB object of zstd
    RLE blocks becomes 1 GiB in the gateway's memory (a 1 MiB one, 32 GiB)."""
    backend = LocalDirBackend(tmp_path / "store")
    bomb = zstandard.ZstdCompressor(level=1).compressobj()
    zeros, blob = bytes(64 << 20), b""
    for _ in range(16):  # 1 GiB of zeros
        blob += bomb.compress(zeros)
    blob += bomb.flush()
    assert len(blob) < 1 << 20
    await backend.put("dbs/app/wal/v1/000000010000000000000001.zst", blob)
    tracemalloc.start()
    try:
        try:
            await segment_size(backend, "dbs/app/wal/v1/000000010000000000000001.zst")
        except Exception:  # noqa: BLE001  (a refusal is fine; the memory is what counts)
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"reading 36 bytes of a {len(blob) >> 10} KiB WAL object took {peak >> 20} MiB"
