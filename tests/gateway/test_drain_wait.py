"""A start that waits for a draining holder (compute/lifecycle.py `_claim_after_drains`), with
fake Postgres processes and a fake lease: the holder drains longer than start_timeout."""

from __future__ import annotations

import asyncio

import pytest

from gateway import errors
from storage.leases import LeaseHeld

from .fake_postgres import fake_manager


async def test_a_holder_draining_past_start_timeout_is_told_as_held_not_as_storage_down(tmp_path, monkeypatch):
    """The wait for the drain and the claim share one deadline: the client must hear that
    the database is open on a gateway that shuts down (57P03, retry), not that storage did
    not answer in time, which sends the operator after a storage outage there is not."""
    manager = fake_manager(tmp_path, monkeypatch, databases=1, start_timeout=1.0)
    claims = []

    async def claim(db_id):
        claims.append(db_id)
        raise LeaseHeld(db_id, "gw-old", None, draining=True)

    async def drained(db_id, poll=0.3):
        await asyncio.sleep(3600)  # it drains, and drains
    monkeypatch.setattr(manager.leases, "claim", claim)
    monkeypatch.setattr(manager.leases, "drained", drained)
    with pytest.raises(errors.GatewayError) as e:
        await asyncio.wait_for(manager.acquire("db0"), 10)
    assert e.value.code == errors.CANNOT_CONNECT_NOW
    assert "open on another gateway (gw-old), which is shutting down" in e.value.message, e.value.message
    assert claims  # it did try


async def test_a_lease_freed_just_before_the_wait_is_claimed_at_once(tmp_path, monkeypatch):
    """The holder let go between the refused claim and the first look at its drain: the next
    claim follows at once, not after a poll interval."""
    manager = fake_manager(tmp_path, monkeypatch, databases=1, start_timeout=5.0)
    loop = asyncio.get_running_loop()
    times = []

    async def claim(db_id):
        times.append(loop.time())
        if len(times) == 1:
            raise LeaseHeld(db_id, "gw-old", None, draining=True)
        return True

    async def drained(db_id, poll=0.3):
        return False  # no lease any more: nothing to wait for
    monkeypatch.setattr(manager.leases, "claim", claim)
    monkeypatch.setattr(manager.leases, "drained", drained)
    manager.release(await asyncio.wait_for(manager.acquire("db0"), 10))
    assert len(times) == 2 and times[1] - times[0] < 0.2, times
