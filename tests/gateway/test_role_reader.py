"""gateway/compute/role_reader.py with a fake connection: callers that arrive while a read runs share
the next one, which starts after they arrived; a failure reaches every waiter and the next
read reconnects; a caller that gives up does not stop the read for the others."""

from __future__ import annotations

import asyncio

import pytest

from gateway.compute.role_reader import RoleReader


class FakeConn:
    closed = False

    async def close(self) -> None:
        self.closed = True


class Source:
    """A query whose answer is the count of writes seen when it *started*."""

    def __init__(self) -> None:
        self.writes, self.connects, self.fail = 0, 0, False
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def connect(self):
        self.connects += 1
        return FakeConn()

    async def query(self, conn, names=None) -> int:
        seen = self.writes
        self.started.set()
        await self.gate.wait()
        if self.fail:
            raise OSError("connection lost")
        return seen


async def test_reads_are_fresh_and_shared():
    src = Source()
    reader = RoleReader(src.connect, src.query, timeout=5)
    assert await reader.read() == 0
    src.gate.clear()
    src.started.clear()
    first = asyncio.ensure_future(reader.read())  # starts a read that waits at the gate
    await src.started.wait()
    src.writes = 1  # committed after the first read began: a later caller must see it
    later = [asyncio.ensure_future(reader.read()) for _ in range(20)]
    await asyncio.sleep(0)
    src.gate.set()
    assert await first == 0
    assert set(await asyncio.gather(*later)) == {1}
    assert reader.queries == 3  # the first, the one in flight, one shared by twenty callers
    assert src.connects == 1  # one connection throughout


async def test_a_failure_reaches_every_waiter_and_the_next_read_reconnects():
    src = Source()
    reader = RoleReader(src.connect, src.query, timeout=5)
    src.fail = True
    results = await asyncio.gather(reader.read(), reader.read(), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    src.fail = False
    assert await reader.read() == 0 and src.connects == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_read_of_others():
    src = Source()
    reader = RoleReader(src.connect, src.query, timeout=5)
    src.gate.clear()
    impatient, patient = asyncio.ensure_future(reader.read()), asyncio.ensure_future(reader.read())
    await asyncio.sleep(0)
    impatient.cancel()
    src.gate.set()
    assert await patient == 0
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_a_hanging_read_times_out():
    src = Source()
    src.gate.clear()
    reader = RoleReader(src.connect, src.query, timeout=0.05)
    with pytest.raises(asyncio.TimeoutError):
        await reader.read()


class Named(Source):
    """A query that answers with the names it was asked for (None: all)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[frozenset[str] | None] = []

    async def query(self, conn, names=None):
        self.asked.append(names)
        await self.gate.wait()
        return names


async def test_a_read_covers_the_names_asked_for_while_it_waited():
    """Logins ask for their own role only; those arriving together share one read of all
    their names, and one that asks for every role makes it a whole read."""
    src = Named()
    reader = RoleReader(src.connect, src.query, timeout=5)
    assert await reader.read(["a"]) == frozenset({"a"})
    src.gate.clear()
    first = asyncio.ensure_future(reader.read(["a"]))
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(reader.read([n])) for n in ("b", "c", "b")]
    await asyncio.sleep(0)
    src.gate.set()
    assert await first == frozenset({"a"})
    assert set(await asyncio.gather(*later)) == {frozenset({"b", "c"})}
    src.gate.clear()
    first = asyncio.ensure_future(reader.read(["a"]))
    await asyncio.sleep(0)
    both = [asyncio.ensure_future(reader.read(["d"])), asyncio.ensure_future(reader.read())]
    await asyncio.sleep(0)
    src.gate.set()
    await first
    assert await asyncio.gather(*both) == [None, None]  # the whole read answers both
    assert src.asked == [frozenset({"a"}), frozenset({"a"}), frozenset({"b", "c"}), frozenset({"a"}), None]
