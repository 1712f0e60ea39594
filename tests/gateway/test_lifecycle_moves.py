"""The lifecycle of one database as a state machine (gateway/compute/lifecycle.py), driven with
fake Postgres processes and local-directory storage: each transition moves along an edge of
the diagram, in the order the diagram gives, and a move it does not have is caught."""

from __future__ import annotations

import asyncio

import pytest

from gateway.compute.lifecycle import EDGES, State

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
