"""A gateway whose lease heartbeat cannot reach storage stops its databases before any other
gateway may take them over (storage/leases.py): every instance at once, without waiting on
saves against the dead store; the saves follow once storage is back, under a fresh lease."""

from __future__ import annotations

import asyncio
import time

import psycopg

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
