"""The instance cap and fencing in the instance manager, with fake Postgres processes (no
server, no storage service): a start takes a while, and the test counts how many run at once."""

from __future__ import annotations

import asyncio

import pytest

from gateway import errors

from .fake_postgres import FakeProcess, fake_manager


@pytest.fixture
def manager(tmp_path, monkeypatch):
    return fake_manager(tmp_path, monkeypatch, max_instances=2)


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


async def test_full_is_what_a_start_would_find(manager):
    """`full()` (placement in a fleet: a full gateway sends a new database elsewhere) says
    what a start here would meet: room, or an idle instance it can stop for one. An idle
    instance whose lock is held (being stopped or saved right now) cannot be stopped for
    it, so with only such ones the gateway is full; `full()` used to count it as room, and
    the client then got 53300 here instead of being placed on a gateway with room."""
    held = [await manager.acquire(f"db{n}") for n in range(2)]
    assert manager.full()  # both in use
    manager.release(held[0])
    assert not manager.full()  # db0 is idle: a start would stop it
    async with manager.database("db0").lock:  # db0 is busy with a transition of its own
        assert manager.full()
        with pytest.raises(errors.GatewayError, match="too many databases"):
            await asyncio.wait_for(manager.acquire("db2"), 5)
    manager.release(held[1])
