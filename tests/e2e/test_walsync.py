"""durability=sync (gateway/compute/walship.py): the instance's synchronous standby is the
gateway's receiver, which reports WAL flushed only once storage holds it, so a commit returns
to its client only then; with storage down, sync_fallback decides (fail or async). Real
instances on private sockets, storage on moto through a proxy that can cut it."""

from __future__ import annotations

import asyncio
import shutil
import time

import psycopg
import pytest

from gateway.compute import dbroles, walreceiver, walship
from storage.wal import parse_lsn

from .test_walship import (  # noqa: F401  (fixtures)
    Instance, commit, ids, instances, s3_backend, shipper, started_with_table, stored_within, templates)

pytestmark = pytest.mark.slow
TIMEOUT = 2.0  # sync_timeout in these tests


async def started_sync(instances) -> tuple[Instance, object]:
    """An instance with a table, running with the receiver as its synchronous standby; the base
    copy taken before any row."""
    inst = instances()
    base = await started_with_table(inst)
    await inst.stop()
    await inst.start(walship.instance_options(sync=True))
    return inst, base


async def insert_returning_lsn(conn, i: int) -> int:
    """Insert row `i` in its own transaction; the WAL position reached before its commit record."""
    row = await (await conn.execute("INSERT INTO public.t (id) VALUES (%s) RETURNING pg_current_wal_insert_lsn()::text",
                                    (i,))).fetchone()
    return parse_lsn(row[0])


@pytest.mark.parametrize("sync", [True, False])
async def test_a_commit_returns_only_once_its_wal_is_in_storage(instances, s3_backend, sync):
    """Read storage itself right after each commit returns: in sync mode it always holds the
    commit; in async mode (the control: the check can fail) it mostly does not yet."""
    inst, _ = await started_sync(instances) if sync else (instances(), None)
    if not sync:
        await started_with_table(inst)
    ship = shipper(inst, s3_backend, sync=sync)
    await ship.start()
    store = inst.store(s3_backend)
    held, latencies = [], []
    async with await dbroles.connect(inst.socket_dir) as conn:
        for i in range(30):
            began = time.monotonic()
            before = await insert_returning_lsn(conn, i)
            latencies.append(time.monotonic() - began)
            newest = await store.newest()
            held.append(newest is not None and newest[1] > before)
    batches = ship.receiver.batches
    await ship.stop()
    print(f"sync={sync}: {sum(held)} of {len(held)} commits in storage when they returned; "
          f"commit p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms; {batches} batches received")
    if sync:
        assert all(held)
        assert batches >= len(held)  # each commit's WAL taken as it came: nothing lingers in sync
    else:
        assert not all(held)


async def test_storage_down_commits_fail_after_the_timeout_and_nothing_acknowledged_is_lost(
        instances, s3_backend, s3_proxy):
    inst, base = await started_sync(instances)
    events = []
    ship = shipper(inst, s3_backend, sync=True, sync_timeout=TIMEOUT, count=lambda e, n: events.append((e, n)))
    await ship.start()
    await commit(inst, 1)
    s3_proxy.cut()
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):  # its session is ended: never acknowledged
        await commit(inst, 2)
    waited = time.monotonic() - began
    print(f"the commit waited {waited:.1f} s, then its session ended")
    assert TIMEOUT <= waited < TIMEOUT + 5
    for _ in range(50):  # the session may see its end before the watch has counted it
        if ship.failed_commits:
            break
        await asyncio.sleep(0.05)
    assert ship.failed_commits >= 1 and ship.fallbacks == 0
    assert sum(n for e, n in events if e == "failed_commits") == ship.failed_commits  # the metric

    s3_proxy.restore()
    (flushed,), = await inst.sql("SELECT pg_current_wal_flush_lsn()::text")
    print(f"storage back: caught up in {await stored_within(ship, parse_lsn(flushed), 30.0):.1f} s")
    began = time.monotonic()
    last = await commit(inst, 3)
    print(f"then a commit returned after {time.monotonic() - began:.2f} s")
    await stored_within(ship, last, 1.0)
    committed = await ids(inst)
    assert {1, 3} <= set(committed)  # 2 committed locally when its session ended: in doubt, as
    # for a client whose connection broke during COMMIT
    await inst.stop()
    assert await ship.stop()
    await restored_has(inst, base, s3_backend, committed)


async def test_storage_down_falls_back_to_async_then_returns_to_sync(instances, s3_backend, s3_proxy):
    inst, base = await started_sync(instances)
    events = []
    ship = shipper(inst, s3_backend, sync=True, sync_timeout=TIMEOUT, sync_fallback="async",
                   count=lambda e, n: events.append((e, n)))
    await ship.start()
    await commit(inst, 1)
    s3_proxy.cut()
    began = time.monotonic()
    await commit(inst, 2)  # acknowledged once the fallback is in force
    waited = time.monotonic() - began
    print(f"the commit waited {waited:.1f} s for the fallback")
    assert TIMEOUT <= waited < TIMEOUT + 5
    assert ship.degraded and ship.fallbacks == 1 and ship.failed_commits == 0
    assert events == [("fallback", 1)]  # the metric
    began = time.monotonic()
    await commit(inst, 3)  # while degraded: no wait for storage
    assert time.monotonic() - began < 1.0

    s3_proxy.restore()
    deadline = time.monotonic() + 30
    while ship.degraded and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not ship.degraded, "did not go back to sync after storage returned"
    async with await dbroles.connect(inst.socket_dir) as conn:
        before = await insert_returning_lsn(conn, 4)
    newest = await inst.store(s3_backend).newest()
    assert newest[1] > before  # sync again: in storage when it returned
    await inst.stop()
    assert await ship.stop()
    await restored_has(inst, base, s3_backend, [1, 2, 3, 4])


async def test_fallen_back_with_the_spool_over_budget_commits_fail_instead_of_waiting_for_ever(
        instances, s3_backend, s3_proxy):
    """sync_fallback=async acknowledges commits from the spool while storage is down. Once
    the spool is over its budget the receiver is disconnected, so nothing can acknowledge a
    commit: they waited without end; now they fail after sync_timeout, as with "fail"."""
    inst, base = await started_sync(instances)
    ship = shipper(inst, s3_backend, sync=True, sync_timeout=TIMEOUT, sync_fallback="async",
                   spool_budget=8 << 20)
    await ship.start()
    await commit(inst, 1)
    s3_proxy.cut()
    await commit(inst, 2)  # acknowledged once the fallback is in force
    assert ship.degraded
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):  # its session is ended: not acknowledged
        async with asyncio.timeout(TIMEOUT + 20):
            await inst.sql("INSERT INTO public.t SELECT g, repeat('z', 500) FROM generate_series(10, 30000) g")
    waited = time.monotonic() - began
    print(f"the commit over the spool's budget failed after {waited:.1f} s")
    deadline = time.monotonic() + 5  # counted once the terminate query has answered
    while ship.failed_commits < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert ship.paused and ship.failed_commits >= 1
    assert waited < TIMEOUT + 10

    s3_proxy.restore()
    deadline = time.monotonic() + 60
    while (ship.paused or ship.degraded) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not ship.paused and not ship.degraded
    await commit(inst, 3)
    committed = await ids(inst)  # the ended session's rows may be there: in doubt, as for a broken COMMIT
    assert {1, 2, 3} <= set(committed)
    await inst.stop()
    assert await ship.stop()
    await restored_has(inst, base, s3_backend, committed)


async def restored_has(inst: Instance, base, backend, rows: list[int]) -> None:
    """The base plus the stored WAL (nothing local: the machine is gone) has exactly `rows`."""
    shutil.rmtree(inst.root / "spool")
    await inst.restore(base, inst.store(backend))
    await inst.start()
    assert await ids(inst) == sorted(rows)




async def test_commits_fail_after_the_timeout_while_the_instance_refuses_every_stream(instances, s3_backend, monkeypatch):
    """The instance refuses each new stream at once (for example its slot's WAL is gone): a
    stream refused before it began counted as one that ran, so each retry restarted the clock
    of `stuck_for` and the waiting commits outlived sync_timeout by the receiver's backoff
    (up to 10 s a retry: with a timeout above that, for ever)."""
    inst, _ = await started_sync(instances)
    ship = shipper(inst, s3_backend, sync=True, sync_timeout=TIMEOUT)
    await ship.start()
    await commit(inst, 1)

    async def refused(self, start):
        raise walreceiver.ReceiverError("START_REPLICATION refused by the instance (test)")
    monkeypatch.setattr(walship.WalReceiver, "stream", refused)
    await ship.receiver.close()  # the stream ends; every new one is refused
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        await commit(inst, 2)
    waited = time.monotonic() - began
    print(f"the commit waited {waited:.1f} s, then its session ended")
    assert waited < TIMEOUT + 3
    await inst.stop()
    await ship.stop(timeout=0.1)
