"""Faults on the lifecycle's seams, with fake Postgres processes and an in-memory store that
can hang (tests/storage/fake_store.py): a hanging store, a stop that cannot record its state,
and a version pointer another gateway moved (a rolling restart). The same defects are also
tested end to end with real Postgres (tests/e2e/test_lifecycle_seams.py)."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest

from gateway import errors, supervise
from gateway.compute.states import State

from ..storage.fake_store import FakeBackend, Store
from .fake_postgres import SECURED, FakeProcess, FakeReader, fake_manager


async def _used(manager, db_id: str) -> None:
    manager.release(await manager.acquire(db_id))


def _slow_stops(monkeypatch) -> None:
    """Every postmaster's stop takes a while (a shutdown checkpoint): `stopping` at once,
    halted 0.3 s later."""
    stop = FakeProcess.stop

    async def slow_stop(self, timeout):
        self.stopping = True
        await asyncio.sleep(0.3)
        await stop(self, timeout)
    monkeypatch.setattr(FakeProcess, "stop", slow_stop)


def _slow_roles_reads(monkeypatch) -> None:
    """The roles read before a shutdown takes 0.3 s (Postgres' `stopping` is not set meanwhile)."""
    async def slow_read(self, names=None):
        await asyncio.sleep(0.3)
        return None, SECURED
    monkeypatch.setattr(FakeReader, "read", slow_read)


async def test_a_hanging_store_is_told_as_57P03_within_start_timeout(tmp_path, monkeypatch):
    backend = FakeBackend(Store(time.time))
    m = fake_manager(tmp_path, monkeypatch, databases=1, backend=backend, start_timeout=1.0)
    await _used(m, "db0")
    await m.stop("db0")  # saved
    assert await m.database("db0").evict_copy()  # only in storage now
    backend.partition(hang=True)  # accepts the request, never answers
    began = time.monotonic()
    with pytest.raises(errors.GatewayError) as e:
        await m.acquire("db0")
    assert e.value.code == errors.CANNOT_CONNECT_NOW and "storage" in e.value.message
    assert time.monotonic() - began < 3.0
    backend.heal()
    await _used(m, "db0")  # storage is back: the next client is served


async def test_a_stop_that_cannot_record_its_state_frees_the_database(tmp_path, monkeypatch):
    m = fake_manager(tmp_path, monkeypatch, databases=1, idle_timeout=0.0)
    await _used(m, "db0")
    real = m.databases.mark_stopped

    def disk_full(db_id, *, changed):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(m.databases, "mark_stopped", disk_full)
    with pytest.raises(OSError):
        await m.reap_idle()  # the gateway's supervisor logs it and runs the next round
    assert m.instances == {} and FakeProcess.running == 0
    monkeypatch.setattr(m.databases, "mark_stopped", real)
    await _used(m, "db0")  # its file lock was released: it starts again
    assert await m.database("db0").state() is State.RUNNING


async def test_a_wake_restores_the_version_another_gateway_saved_meanwhile(tmp_path, monkeypatch):
    store = Store(time.time)
    a = fake_manager(tmp_path / "a", monkeypatch, databases=1, backend=FakeBackend(store))
    await _used(a, "db0")
    await a.stop("db0")
    assert await a.database("db0").evict_copy()
    assert await a.roles("db0")  # authentication reads (and caches) the pointer: version 1
    b = fake_manager(tmp_path / "b", monkeypatch, databases=0, backend=FakeBackend(store))
    await _used(b, "db0")  # a rolling restart: the other gateway serves it and saves version 2
    await b.stop("db0")
    newest = b.databases.state("db0").version
    assert newest != a.databases.state("db0").version
    await _used(a, "db0")
    assert a.databases.state("db0").version == newest


async def test_many_wakes_of_one_database_start_one_postmaster(tmp_path, monkeypatch):
    m = fake_manager(tmp_path, monkeypatch, databases=1)
    insts = await asyncio.gather(*(m.acquire("db0") for _ in range(12)))
    assert len({id(i) for i in insts}) == 1 and m.starts == 1 and FakeProcess.running == 1


async def test_a_fence_returns_only_once_a_stop_in_progress_has_halted(tmp_path, monkeypatch):
    """When the fence returns, nothing of a lapsed database may run (keep_alive gives its lease
    up right after). An idle stop that holds the lock and is still halting the postmaster was
    left to itself: the fence returned while the postmaster ran."""
    m = fake_manager(tmp_path, monkeypatch, databases=1, idle_timeout=0.0)
    await _used(m, "db0")
    _slow_stops(monkeypatch)
    reaping = asyncio.create_task(m.reap_idle())
    await asyncio.sleep(0.1)  # the idle stop halts the postmaster, holding the lock
    await m.fence()
    assert FakeProcess.running == 0, "the fence returned while the postmaster still ran"
    await reaping


async def test_a_client_during_a_fence_does_not_kill_or_restart_the_fenced_instance(tmp_path, monkeypatch):
    """The fence stops an instance without the database's lock (a stop holding it may be
    saving). A client that arrives while that fast shutdown runs must not take the halting
    postmaster for a crashed one: that killed it mid-shutdown, started shipping its WAL to
    storage after the lease had lapsed, and went on to start a second postmaster on the copy
    (once a claim succeeded) while the fence still recorded the first one's stop."""
    m = fake_manager(tmp_path, monkeypatch, databases=1)
    await _used(m, "db0")
    _slow_stops(monkeypatch)
    fencing = asyncio.create_task(m.fence())
    await asyncio.sleep(0.1)  # the fence halts the postmaster
    with pytest.raises(errors.GatewayError) as e:
        await m.acquire("db0")
    assert e.value.code == errors.CANNOT_CONNECT_NOW
    await fencing
    assert FakeProcess.most == 1 and FakeProcess.running == 0
    assert m.database("db0").phase is State.FENCED and m.shared.unexpected == 0
    await _used(m, "db0")  # once the fence is over, the next client starts it again


async def test_an_idle_stop_leaves_alone_an_instance_a_fence_stops(tmp_path, monkeypatch):
    """The fence reads the roles before its fast shutdown begins (`stopping` is set only then).
    An idle stop in that moment took the instance for its own and stopped (and saved) it a
    second time, beside the fence."""
    m = fake_manager(tmp_path, monkeypatch, databases=1, idle_timeout=0.0)
    await _used(m, "db0")
    _slow_roles_reads(monkeypatch)
    fencing = asyncio.create_task(m.fence())
    await asyncio.sleep(0.1)  # the fence reads the roles
    await m.reap_idle()
    await fencing
    assert FakeProcess.running == 0, "stopped twice"
    assert m.database("db0").phase is State.FENCED and m.shared.unexpected == 0


async def test_a_start_that_needs_the_slot_of_a_fenced_instance_waits_for_its_halt(tmp_path, monkeypatch):
    """At the instance cap, the least recently used idle instance is stopped for a start. One
    a fence is stopping (without its lock) was picked again and again without being stopped:
    the start spun on the event loop, every other task of the gateway (the fence's halt, the
    heartbeat, all clients) frozen, until start_timeout refused it."""
    m = fake_manager(tmp_path, monkeypatch, databases=2, max_instances=1, start_timeout=2.0)
    await _used(m, "db0")
    _slow_stops(monkeypatch)
    fencing = asyncio.create_task(m.fence())
    await asyncio.sleep(0.1)  # the fence halts db0, which holds the one slot
    began = time.monotonic()
    await _used(m, "db1")  # served once db0 has halted
    assert time.monotonic() - began < 1.0
    await fencing
    assert FakeProcess.most == 1


async def test_a_start_in_progress_at_shutdown_is_stopped_as_well(tmp_path, monkeypatch):
    """stop_all stopped only the instances running when it began: a cold start in progress
    finished after it and left its postmaster running, unsaved and holding its lease, after
    the gateway had exited."""
    m = fake_manager(tmp_path, monkeypatch, databases=1)
    start = FakeProcess.start

    async def slow_start(self, timeout):
        await asyncio.sleep(0.3)
        await start(self, timeout)
    monkeypatch.setattr(FakeProcess, "start", slow_start)
    waking = asyncio.create_task(m.acquire("db0"))
    await asyncio.sleep(0.1)  # its postmaster is starting
    await m.stop_all()
    inst = await waking  # the client got its instance, which was stopped at shutdown
    assert not inst.alive and FakeProcess.running == 0 and m.instances == {}
    state = m.databases.state("db0")
    assert not state.running and not state.dirty  # and saved


async def test_a_requested_stop_or_an_operation_waits_for_the_fence_instead_of_stopping_twice(
        tmp_path, monkeypatch):
    """A stop that holds the lock (shutdown, `pgsni db stop`, an operation's `held()`) while the
    fence stops the instance without it: it stopped the same postmaster a second time and
    recorded a stop of its own beside the fence's; it waits for the fence now, which stopped it."""
    m = fake_manager(tmp_path, monkeypatch, databases=2)
    await _used(m, "db0")
    await _used(m, "db1")
    _slow_stops(monkeypatch)
    fencing = asyncio.create_task(m.fence())
    await asyncio.sleep(0.1)  # the fence halts both
    assert not await m.stop("db0")  # nothing left to stop once the fence is over
    async with m.stopped("db1", "test") as held:
        assert not held.stopped
    await fencing
    assert FakeProcess.running == 0, "stopped twice"
    assert m.database("db0").phase is State.FENCED and m.shared.unexpected == 0


async def test_shutdown_does_not_cut_an_idle_stop_short(tmp_path, monkeypatch):
    """Shutdown ends the background loops (supervise.cancel_all) before stop_all. An idle stop
    the reaper was making then was cancelled half-way: its save cut off, the copy left with
    unsaved changes that stop_all (which stops running instances) never saved, and its lease
    kept, to expire after the gateway exited."""
    m = fake_manager(tmp_path, monkeypatch, databases=1, idle_timeout=0.0)
    await _used(m, "db0")
    save = m.databases.save

    async def slow_save(db_id, **kw):  # an upload that takes a moment
        await asyncio.sleep(0.3)
        return await save(db_id, **kw)
    monkeypatch.setattr(m.databases, "save", slow_save)
    reaper = asyncio.create_task(supervise.every("reap_idle", lambda: 0.0, m.reap_idle, m.metrics))
    await asyncio.sleep(0.15)  # the reaper stops db0 and saves it
    await supervise.cancel_all([reaper])  # as shutdown does first
    await m.stop_all()
    state = m.databases.state("db0")
    assert not state.running and not state.dirty, "the idle stop's save was cut off"


async def test_an_early_login_is_not_given_an_instance_a_fence_stops(tmp_path, monkeypatch):
    """A login that looks for an instance running now (early logins) must not be handed one
    the fence is about to stop: its lease lapsed, and a session begun there would write
    commits no save of this gateway may store, then be cut off by the fast shutdown."""
    m = fake_manager(tmp_path, monkeypatch, databases=1)
    await _used(m, "db0")
    _slow_roles_reads(monkeypatch)
    fencing = asyncio.create_task(m.fence())
    await asyncio.sleep(0.1)  # the fence reads the roles: the postmaster still runs
    assert m.database("db0").instance is not None
    assert await m.acquire_running("db0") is None
    await fencing
    assert m.database("db0").phase is State.FENCED


async def test_a_database_that_fails_to_start_waits_before_the_next_try(tmp_path, monkeypatch):
    """Starts share one rate (wake_rate) across all databases. A database whose Postgres fails
    to start (a setting its tenant stored, a damaged file) was started again at every login,
    each spending a turn of that rate and a failed postmaster: one tenant looping on logins
    held back every other tenant's cold starts. After failed starts, logins within a growing
    pause get the failure again at once, without a start (the first two retries come at
    once: an operator who fixed the cause finds it working at the next login)."""
    from gateway.compute import lifecycle
    from gateway.compute.postgres import PostgresError

    monkeypatch.setattr(lifecycle, "START_RETRY_SECONDS", (0.3, 1.2))
    m = fake_manager(tmp_path, monkeypatch, databases=2)
    tries = []

    async def broken(self, timeout):
        tries.append(self.pgdata)
        raise PostgresError("postgres exited with code 1: FATAL: invalid value for parameter")
    real = FakeProcess.start
    monkeypatch.setattr(FakeProcess, "start", broken)
    monkeypatch.setattr(lifecycle, "START_FREE_RETRIES", 2)
    for attempt in range(5):
        with pytest.raises(errors.GatewayError) as failed:
            await m.acquire("db0")
        assert "could not be started" in failed.value.message
        if attempt >= 3:
            assert "next try in" in failed.value.detail, failed.value.detail
    assert len(tries) == 3, "the first two retries come at once, then a pause"
    await asyncio.sleep(0.35)
    with pytest.raises(errors.GatewayError):
        await m.acquire("db0")
    assert len(tries) == 4  # after the pause: tried again, failed, the pause doubles
    await asyncio.sleep(0.35)
    with pytest.raises(errors.GatewayError):
        await m.acquire("db0")
    assert len(tries) == 4
    monkeypatch.setattr(FakeProcess, "start", real)
    await _used(m, "db1")  # another database starts meanwhile
    await asyncio.sleep(0.3)
    await _used(m, "db0")  # fixed: starts once its pause is over, and the pause is reset
    assert await m.database("db0").state() is State.RUNNING
