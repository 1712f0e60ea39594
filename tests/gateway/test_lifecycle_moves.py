"""The lifecycle of one database as a state machine (gateway/compute/lifecycle.py), driven with
fake Postgres processes and local-directory storage: each transition moves along an edge of
the diagram, in the order the diagram gives, and a move it does not have is caught."""

from __future__ import annotations

import asyncio

import pytest

from gateway.compute.lifecycle import EDGES, Database, State

from .fake_postgres import fake_manager

S = State


@pytest.fixture
def manager(tmp_path, monkeypatch):
    return fake_manager(tmp_path, monkeypatch, databases=2, max_instances=4)


def moves(manager, db_id: str) -> list[State]:
    return [state for _, state, _ in manager.database(db_id).history]


async def _used(manager, db_id: str) -> None:
    manager.release(await manager.acquire(db_id))


async def test_start_stop_save_evict_restore(manager):
    await _used(manager, "db0")
    assert await manager.database("db0").state() is S.RUNNING
    await manager.stop("db0")  # nothing tells the fake copy is clean: saved as changed
    assert moves(manager, "db0") == [S.STARTING, S.RUNNING, S.CHANGED, S.LOCAL]
    assert await manager.database("db0").state() is S.LOCAL
    assert await manager.database("db0").evict_copy()
    assert await manager.database("db0").state() is S.STORED
    await _used(manager, "db0")  # restored from storage, then started
    assert moves(manager, "db0")[-3:] == [S.LOCAL, S.STARTING, S.RUNNING]
    assert manager.shared.unexpected == 0


async def test_a_stop_that_wrote_nothing_is_not_saved(manager, monkeypatch):
    await _used(manager, "db0")
    await manager.stop("db0")
    saved = manager.databases.state("db0").version

    async def nothing_written(inst):
        return False
    monkeypatch.setattr(manager.launcher, "written", nothing_written)
    await _used(manager, "db0")
    await manager.stop("db0")
    assert moves(manager, "db0")[-3:] == [S.STARTING, S.RUNNING, S.LOCAL]
    assert manager.databases.state("db0").version == saved
    assert manager.shared.unexpected == 0


async def test_a_crash_leaves_the_copy_changed_and_the_next_client_starts_it(manager):
    inst = await manager.acquire("db0")
    inst.process.crash()
    for _ in range(100):
        if manager.database("db0").instance is None:
            break
        await asyncio.sleep(0.01)
    assert moves(manager, "db0")[-1] is S.CHANGED
    assert manager.databases.state("db0").dirty and not manager.databases.state("db0").running
    manager.release(inst)
    await _used(manager, "db0")
    assert moves(manager, "db0")[-2:] == [S.STARTING, S.RUNNING]
    assert manager.shared.unexpected == 0


async def test_fencing_then_the_save_under_a_fresh_lease(manager):
    await _used(manager, "db0")
    await manager.fence()
    assert moves(manager, "db0")[-1] is S.FENCED
    assert manager.databases.state("db0").dirty  # not saved while fenced
    await manager.maintain()  # the lease is claimed again: saved
    assert moves(manager, "db0")[-2:] == [S.CHANGED, S.LOCAL]
    assert not manager.databases.state("db0").dirty
    assert manager.shared.unexpected == 0


async def test_operations_move_a_held_database(manager):
    await _used(manager, "db0")
    async with manager.stopped("db0", "snapshot") as held:
        assert held.stopped
        await held.save_now(note="test")
    first = manager.databases.state("db0").version
    async with manager.stopped("db0", "restoring") as held:
        await held.roll_back(first)
    async with manager.stopped("db0", "deleted", save=False) as held:
        await held.remove(everywhere=True)
    assert moves(manager, "db0")[-3:] == [S.LOCAL, S.LOCAL, S.ABSENT]
    assert await manager.database("db0").state() is S.ABSENT
    assert manager.shared.unexpected == 0


async def test_a_move_the_diagram_does_not_have_is_caught(manager, caplog):
    db = manager.database("db1")
    db.move(S.STORED, "test")
    db.move(S.RUNNING, "test: a stored database cannot run before it is restored and started")
    assert manager.shared.unexpected == 1
    assert "does not allow" in caplog.text


def test_every_state_has_its_way_out():
    assert set(EDGES) == set(State)
    for state, targets in EDGES.items():
        assert targets - {state}, f"{state} is a dead end"


async def test_one_database_failing_in_maintenance_leaves_the_others_their_turn(manager, monkeypatch):
    """maintain() went through the databases in one loop: an unexpected error in one (a
    retry_save that raised) ended the round, every round, so the databases after it were
    never saved and the cache never trimmed. The round still ends in that error, so the
    supervisor logs and counts it (pgsni_background_errors_total)."""
    for db_id in ("db0", "db1"):
        await _used(manager, db_id)
        await manager.fence()  # stopped with unsaved changes: maintenance saves them
    retry, tried = Database.retry_save, []
    broken = sorted(manager.databases.dirty_stopped())[0]

    async def first_one_breaks(self):
        tried.append(self.id)
        if self.id == broken:
            raise RuntimeError("unexpected (test)")
        await retry(self)
    monkeypatch.setattr(Database, "retry_save", first_one_breaks)
    trimmed = []

    async def keep_budget():
        trimmed.append(True)
    monkeypatch.setattr(manager, "_keep_budget", keep_budget)
    with pytest.raises(RuntimeError, match="unexpected"):
        await manager.maintain()
    assert sorted(tried) == ["db0", "db1"] and trimmed == [True]
    assert [d for d in ("db0", "db1") if manager.databases.state(d).dirty] == [broken]


async def test_one_database_failing_its_idle_stop_leaves_the_others_theirs(tmp_path, monkeypatch):
    manager = fake_manager(tmp_path, monkeypatch, databases=2, max_instances=4, idle_timeout=0.0)
    for db_id in ("db0", "db1"):
        await _used(manager, db_id)
    stop, tried = Database.stop_if_idle, []

    async def first_one_breaks(self, idle_timeout):
        tried.append(self.id)
        if len(tried) == 1:
            raise RuntimeError("unexpected (test)")
        await stop(self, idle_timeout)
    monkeypatch.setattr(Database, "stop_if_idle", first_one_breaks)
    with pytest.raises(RuntimeError, match="unexpected"):
        await manager.reap_idle()
    assert sorted(tried) == ["db0", "db1"]
    assert set(manager.instances) == {tried[0]}, "the other idle database was stopped"


async def test_a_login_in_progress_puts_the_idle_stop_off_but_not_for_long(tmp_path, monkeypatch):
    """An early login (a client still authenticating) is not use: strangers who never send a
    password must not keep a database up. But it is not cut off mid-login either: the idle
    stop waits for it up to twice idle_timeout."""
    import time

    manager = fake_manager(tmp_path, monkeypatch, databases=1, idle_timeout=10.0)
    await _used(manager, "db0")
    inst = manager.instances["db0"]
    early = await manager.acquire_running("db0")  # a client logging in
    assert early is inst and inst.early == 1 and not inst.in_use
    inst.last_used = time.monotonic() - 15.0  # idle for 1.5 idle_timeouts
    await manager.reap_idle()
    assert "db0" in manager.instances, "a client mid-login was cut off"
    inst.last_used = time.monotonic() - 25.0  # past twice idle_timeout: strangers, not a login
    await manager.reap_idle()
    assert "db0" not in manager.instances
