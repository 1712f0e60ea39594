"""The other live gateways of the fleet, as their heartbeats say (storage/heartbeats.py), read
at most every few seconds; and the gateway numbers written into long cancel keys.

A gateway's number is a hash of its name into 1-65535, so every gateway computes every other's
without coordination; two names may share a number, which the heartbeats reveal (logged), so a
number narrows the search but never proves where a key is from.

Each peer comes with the address to reach it by: its network address, or for a worker of this
gateway's own machine (gateway/workers.py: its local channel in this worker's channel
directory) that channel, the cheaper path (local_links.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from storage.backend import Backend
from storage.errors import StorageError
from storage.heartbeats import Heartbeat, live_gateways

from .links import LinkUnreachable
from .local_links import is_local, socket_path

log = logging.getLogger("pgsni.peers")

REFRESH_SECONDS = 2.0  # the list of live gateways is read again after this
MIN_READ_INTERVAL = 0.5  # and never more often, whatever callers ask: storage reads cost money


def gateway_number(holder: str) -> int:
    return 1 + int.from_bytes(hashlib.sha256(holder.encode()).digest()[:4], "big") % 0xFFFF


class Peers:
    def __init__(self, backend: Backend, me: Callable[[], str], *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, channel_dir: Path | None = None) -> None:
        """`channel_dir`: where this worker's machine keeps its workers' channels (None: this
        gateway is not a worker)."""
        self.backend, self._me, self.clock, self.monotonic = backend, me, clock, monotonic
        self.channel_dir = channel_dir
        self._live: list[Heartbeat] = []
        self._read_at: float | None = None
        self._lock = asyncio.Lock()  # callers at once share one read
        self._collisions: set[str] = set()

    async def others(self, max_age: float = REFRESH_SECONDS) -> list[Heartbeat]:
        """The other live gateways that publish an address, from a list at most `max_age` old
        (at least MIN_READ_INTERVAL; storage failing: the last list read), each with the
        address to reach it by as its `address`."""
        async with self._lock:
            age = None if self._read_at is None else self.monotonic() - self._read_at
            if age is None or age >= max(max_age, MIN_READ_INTERVAL):
                await self._refresh()
        me = self._me()
        return [b for b in (self._reach(g) for g in self._live if g.holder != me and g.address) if b.address]

    def _reach(self, beat: Heartbeat) -> Heartbeat:
        """`beat` with the address to reach it by as its `address`: its local channel if it is a
        worker of this machine, else its network address, else "" (not reachable). A channel
        counts only in this worker's channel directory (0700, made by this machine's
        supervisor): a datagram crosses no TLS, so a `local:` address elsewhere (in a heartbeat
        anyone who can write to the bucket could forge) might be a socket any local user bound,
        and would be handed client sockets and cancel keys."""
        channel = beat.local or (beat.address if is_local(beat.address) else "")
        if channel and self._in_channel_dir(channel):
            return replace(beat, address=channel)
        return replace(beat, address="") if is_local(beat.address) else beat

    def _in_channel_dir(self, channel: str) -> bool:
        if self.channel_dir is None:  # not a worker: no channel is a sibling's
            return False
        try:
            return socket_path(channel).parent == self.channel_dir
        except LinkUnreachable:  # on another machine
            return False

    async def _refresh(self) -> None:
        self._read_at = self.monotonic()
        try:
            self._live = await live_gateways(self.backend, self.clock())
        except StorageError as e:
            log.warning("reading the other gateways' heartbeats failed (the last list is used): %s", e)
            return
        mine = gateway_number(self._me())
        for g in self._live:
            if g.holder != self._me() and gateway_number(g.holder) == mine and g.holder not in self._collisions:
                self._collisions.add(g.holder)
                log.warning("gateways %s and %s share cancel key number %d: cancels of either are "
                            "sent to both", self._me(), g.holder, mine)
