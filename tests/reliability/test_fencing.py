"""A gateway whose lease heartbeat cannot reach storage stops its databases before any other
gateway may take them over (storage/leases.py): every instance at once, without waiting on
saves against the dead store; the saves follow once storage is back, under a fresh lease."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from storage import snapshots
from storage.errors import StorageUnavailable

from ..support.harness import conninfo, connect_sqlstate, wait_until

TTL = 6.0  # margin = ttl/6 = 1 s: fenced within ttl - margin of the last heartbeat


def test_a_hanging_store_fences_every_instance_in_time(start_gateway, s3_settings, s3_proxy, tls):
    gw = start_gateway(**s3_settings, lease_seconds=TTL)
    for db_id in ("fence1", "fence2", "fence3"):
        gw.create_db(db_id)
        with psycopg.connect(conninfo(gw.port, tls["ca"], db_id), autocommit=True) as conn:
            conn.execute("create table t(x int); insert into t values (1)")  # unsaved changes
    leases = gw.gw.instances.leases
    wait_until(lambda: leases.valid(), what="a heartbeat")
    s3_proxy.delay = 3600.0  # the store accepts connections and never answers
    hung = time.monotonic()
    last_beat = leases._beat_at
    # others may take over once the heartbeat is ttl + margin old; the holder must be gone by
    # ttl - margin, checked here with a second of slack for scheduling
    deadline = last_beat + TTL - leases.margin + 1.0
    wait_until(lambda: gw.running() == set(), timeout=30, what="every instance fenced")
    fenced = time.monotonic()
    assert fenced <= deadline, (f"fenced {fenced - hung:.1f} s after the store hung, "
                                f"{fenced - last_beat:.1f} s after the last heartbeat (ttl {TTL})")
    # the postmasters are gone; each stop records itself in its copy's state just after (a
    # save retried before that finds the copy still marked running and leaves it for the next
    # round of maintenance, which this test runs once)
    ids = ("fence1", "fence2", "fence3")
    wait_until(lambda: not any(gw.gw.databases.state(d).running for d in ids), timeout=10,
               what="the fenced stops recorded")
    for db_id in ids:
        assert gw.gw.databases.state(db_id).dirty  # kept, to be saved later

    s3_proxy.delay = 0.0  # storage is back: the copies are saved under a fresh lease
    gw.call(gw.gw.instances.maintain, timeout=120)
    for db_id in ids:
        assert not gw.gw.databases.state(db_id).dirty, db_id
        with psycopg.connect(conninfo(gw.port, tls["ca"], db_id)) as conn:
            assert conn.execute("select x from t").fetchall() == [(1,)]


def test_a_start_in_progress_when_the_heartbeat_lapses_is_fenced(start_gateway, tls):
    """Found by the lease simulation (seed 133): the fence stopped only running instances, so a
    postmaster starting when the heartbeat lapsed went on to serve after the fence returned
    (and keep_alive gave its lease up). Now the fence waits for the start, which gives up
    before serving anyone: its lease lapsed."""
    ttl = 3.0  # margin 0.5 s
    gw = start_gateway(lease_seconds=ttl)
    gw.create_db("starting")
    gw.call(lambda: gw.gw.instances.stop("starting", "test"))
    instances = gw.gw.instances
    leases, launch = instances.leases, instances.launcher.launch
    fences: list[tuple[float, float]] = []
    fence = instances.fence

    async def timed_fence():
        began = time.monotonic()
        await fence()
        fences.append((began, time.monotonic()))

    async def storage_down():
        raise StorageUnavailable("heartbeats cannot reach storage (test)")

    launched: list[float] = []

    async def slow_launch(inst):  # a postmaster slow to start while storage goes away
        leases.beat = storage_down
        await asyncio.sleep(ttl + 1)  # the heartbeat lapses meanwhile (and the fence begins)
        await launch(inst)
        launched.append(time.monotonic())

    instances.fence = timed_fence
    instances.launcher.launch = slow_launch
    began = time.monotonic()
    assert connect_sqlstate(gw.port, tls["ca"], "starting") == "57P03"
    wait_until(lambda: fences, timeout=5, what="the fence (the heartbeat lapsed during the start)")
    (fence_began, fence_ended), = fences
    (postmaster_ready,) = launched
    assert began < fence_began < postmaster_ready  # it began while the postmaster was starting
    assert fence_ended > postmaster_ready  # and returned only once the start had given up
    assert gw.running() == set() and not instances.starting
    assert not gw.gw.databases.state("starting").running


def test_a_fence_waits_for_a_save_in_progress(start_gateway, tls):
    """The lease of a database being saved when the heartbeat lapses is given up only once the
    save is over (keep_alive gives lapsed leases up when the fence returns): else another
    gateway could take it over and save while this one still writes."""
    ttl = 3.0
    gw = start_gateway(lease_seconds=ttl, durability="snapshot")
    gw.create_db("saving")
    with psycopg.connect(conninfo(gw.port, tls["ca"], "saving"), autocommit=True) as conn:
        conn.execute("create table t(x int); insert into t values (1)")  # unsaved changes
    instances, databases = gw.gw.instances, gw.gw.databases
    leases, save = instances.leases, databases.save
    fences: list[float] = []
    saved: list[float] = []
    fence = instances.fence

    async def timed_fence():
        await fence()
        fences.append(time.monotonic())

    async def storage_down():
        raise StorageUnavailable("heartbeats cannot reach storage (test)")

    async def slow_save(db_id, **kw):  # an upload that outlasts the heartbeat
        leases.beat = storage_down
        await asyncio.sleep(ttl + 1)
        try:
            return await save(db_id, **kw)
        finally:
            saved.append(time.monotonic())

    instances.fence = timed_fence
    databases.save = slow_save
    gw.call(lambda: instances.stop("saving", "test"))
    wait_until(lambda: fences, timeout=5, what="the fence (the heartbeat lapsed during the save)")
    assert saved and fences[0] > saved[0], "the fence returned while the save went on"


def _ops(gw):
    from gateway.ops.operations import Ops
    g = gw.gw
    return Ops(g.settings, g.catalog, g.databases, g.instances)


def _pointer(gw, db_id: str) -> str:
    return gw.call(lambda: gw.gw.databases.current(db_id, fresh=True)).manifest.version


def _stored_then_written(gw, tls, db_id: str) -> str:
    """Create `db_id`, stop it (its first version, returned), then write a row: it runs again,
    with unsaved changes."""
    gw.create_db(db_id)
    gw.call(lambda: gw.gw.instances.stop(db_id, "test"))
    first = _pointer(gw, db_id)
    with psycopg.connect(conninfo(gw.port, tls["ca"], db_id), autocommit=True) as conn:
        conn.execute("create table t(x int); insert into t values (1)")
    return first


def test_an_operation_whose_lease_lapsed_moves_no_pointer(start_gateway, tls, monkeypatch):
    """An operation holds its database under the lease it claimed at its start; one whose
    lease lapses while it works (storage slow: another gateway may take the database over
    meanwhile) must not move the database's pointer at its end, however its work went. Before,
    only the stop-time save and the base backups looked at the lease, and only at their start."""
    gw = start_gateway(lease_seconds=30, durability="snapshot")
    first = _stored_then_written(gw, tls, "opl")
    gw.call(lambda: gw.gw.instances.stop("opl", "test"))
    second = _pointer(gw, "opl")
    assert second != first
    store, leases = gw.gw.databases.store, gw.gw.instances.leases
    manifest = store.manifest

    async def lapse_meanwhile(db_id, version):  # the roll-back reads its target, then points
        found = await manifest(db_id, version)
        leases.held.discard(db_id)  # what a lapse does to the holdings, whatever comes after
        return found
    monkeypatch.setattr(store, "manifest", lapse_meanwhile)
    with pytest.raises(Exception, match="lease on database opl lapsed"):
        gw.call(lambda: _ops(gw).restore("opl", first))
    monkeypatch.setattr(store, "manifest", manifest)
    assert leases.valid() and _pointer(gw, "opl") == second
    # claimed again, the same roll-back goes through
    gw.call(lambda: _ops(gw).restore("opl", first))
    assert _pointer(gw, "opl") == first


def test_a_save_whose_lease_lapsed_during_its_upload_moves_no_pointer(start_gateway, tls, monkeypatch):
    """The stop-time save looked at the lease before its upload only: a lapse during the
    upload (slow storage) left the pointer to be moved all the same. Now the version is kept,
    not made current, the copy stays unsaved, and the save is retried under a fresh claim."""
    gw = start_gateway(lease_seconds=30, durability="snapshot")
    first = _stored_then_written(gw, tls, "savl")
    store, leases = gw.gw.databases.store, gw.gw.instances.leases
    upload = store.backend.upload_file

    async def lapse_meanwhile(key, path):
        done = await upload(key, path)
        leases.held.discard("savl")
        return done
    monkeypatch.setattr(store.backend, "upload_file", lapse_meanwhile)
    gw.call(lambda: gw.gw.instances.stop("savl", "test"))
    monkeypatch.setattr(store.backend, "upload_file", upload)
    assert _pointer(gw, "savl") == first
    assert gw.gw.databases.state("savl").dirty  # kept, to be saved again
    gw.call(gw.gw.instances.maintain, timeout=60)  # the retry claims the lease again
    assert not gw.gw.databases.state("savl").dirty and _pointer(gw, "savl") != first
    with psycopg.connect(conninfo(gw.port, tls["ca"], "savl")) as conn:
        assert conn.execute("select x from t").fetchall() == [(1,)]


def test_a_save_whose_lease_lapsed_before_its_upload_uploads_nothing(start_gateway, tls, monkeypatch):
    """A lapse while the copy is being archived (before any byte went to storage): the upload
    ran all the same, to its end (a whole database over slow storage), only to be refused at
    the pointer. Now it is not begun; the save is retried under a fresh claim."""
    gw = start_gateway(lease_seconds=30, durability="snapshot")
    first = _stored_then_written(gw, tls, "upl")
    store, leases = gw.gw.databases.store, gw.gw.instances.leases
    spool, upload, uploads = snapshots._create_spool, store.backend.upload_file, []

    def lapse_meanwhile(pgdata, path):
        made = spool(pgdata, path)
        leases.held.discard("upl")
        return made

    async def counted(key, path):
        uploads.append(key)
        return await upload(key, path)
    monkeypatch.setattr(snapshots, "_create_spool", lapse_meanwhile)
    monkeypatch.setattr(store.backend, "upload_file", counted)
    gw.call(lambda: gw.gw.instances.stop("upl", "test"))
    assert uploads == [] and _pointer(gw, "upl") == first
    assert gw.gw.databases.state("upl").dirty  # kept, to be saved again
    monkeypatch.setattr(snapshots, "_create_spool", spool)
    gw.call(gw.gw.instances.maintain, timeout=60)  # the retry claims the lease again
    assert len(uploads) == 1 and not gw.gw.databases.state("upl").dirty and _pointer(gw, "upl") != first


def test_a_delete_whose_lease_lapsed_leaves_storage_alone(start_gateway, monkeypatch):
    gw = start_gateway(lease_seconds=30, durability="snapshot")
    gw.create_db("dell")
    gw.call(lambda: gw.gw.instances.stop("dell", "test"))
    catalog, leases = gw.gw.catalog, gw.gw.instances.leases
    delete = catalog.delete

    def lapse_meanwhile(db_id):  # the local copy goes first, then storage's objects
        delete(db_id)
        leases.held.discard(db_id)
    monkeypatch.setattr(catalog, "delete", lapse_meanwhile)
    with pytest.raises(Exception, match="lease on database dell lapsed"):
        gw.call(lambda: _ops(gw).delete("dell", force=True))
    assert gw.call(lambda: gw.gw.databases.current("dell", fresh=True)) is not None
