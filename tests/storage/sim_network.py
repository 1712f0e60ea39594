"""One simulated gateway's connection to the shared in-memory store (tests/storage/fake_store.py),
with the faults of a real network on virtual time (tests/support/virtual_loop.py): every
request travels as a task of its own, owned by no gateway, so the store takes it even while
the gateway that sent it is paused or dead. A request may be delayed on its way in, its answer
delayed or lost; a partition (`partition()`, inherited) makes requests fail at once or hang.
The caller waits at most `timeout` (the backend's retry budget), then gets StorageUnavailable.
A request the store has not taken by the time its caller gives up (that timeout, or the
caller's own) is dropped; with `late_writes`, one already on its way is still taken later."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from storage.errors import StorageError, StorageUnavailable

from ..support.virtual_loop import VirtualTimeLoop
from .fake_store import FakeBackend, Store


@dataclass
class Weather:
    """How requests travel now: each is delayed up to `delay` seconds each way, and its answer
    is lost with probability `lost`."""
    delay: float = 0.0
    lost: float = 0.0


class SimBackend(FakeBackend):
    def __init__(self, store: Store, loop: VirtualTimeLoop, rng: random.Random, timeout: float,
                 late_writes: bool = False) -> None:
        super().__init__(store)
        self.loop, self.rng, self.timeout, self.late_writes = loop, rng, timeout, late_writes
        self.weather = Weather()

    async def get(self, key):
        return await self._request(FakeBackend.get, key)

    async def put(self, key, data, *, if_match=None, if_none_match=False):
        return await self._request(FakeBackend.put, key, data, if_match=if_match,
                                   if_none_match=if_none_match)

    async def head(self, key):
        return await self._request(FakeBackend.head, key)

    async def list(self, prefix):
        return await self._request(FakeBackend.list, prefix)

    async def delete(self, keys):
        return await self._request(FakeBackend.delete, keys)

    def _delay(self) -> float:
        return self.rng.uniform(0, self.weather.delay) if self.weather.delay else 0.0

    async def _request(self, op, *args, **kwargs):
        if not self.weather.delay and not self.weather.lost and not self.down and self._healed.is_set():
            return await op(self, *args, **kwargs)  # calm: taken and answered at once
        sent = {"reached": False, "taken": False}
        lost = self.rng.random() < self.weather.lost
        delays = (self._delay(), self._delay())

        async def travel():
            try:
                await self._reach()  # a partition: fails at once, or hangs until healed
                sent["reached"] = True
                if delays[0]:
                    await asyncio.sleep(delays[0])
                result = await op(self, *args, **kwargs)
                sent["taken"] = True
            except StorageError as e:
                result = e  # returned, not raised: nobody may be waiting to retrieve it
            if lost:
                await asyncio.sleep(1e9)  # the answer never comes
            if delays[1]:
                await asyncio.sleep(delays[1])
            return result

        def give_up() -> None:
            if not sent["taken"] and not (self.late_writes and sent["reached"]):
                trip.cancel()

        trip = self.loop.spawn(None, travel())
        try:
            done, _ = await asyncio.wait({trip}, timeout=self.timeout)
        except asyncio.CancelledError:
            give_up()
            raise
        if trip in done:
            if isinstance(trip.result(), StorageError):
                raise trip.result()
            return trip.result()
        give_up()
        raise StorageUnavailable(f"storage did not answer within {self.timeout:g} s (simulated)")
