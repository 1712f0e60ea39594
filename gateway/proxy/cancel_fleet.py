"""Cancel requests across the fleet. A key this gateway did not issue is relayed over the links
to the other live gateways: a long (3.2) key names its issuer's number, so it goes to the
gateways of that number only (to all when none has it); a 4-byte (3.0) key has no room for
one, so every live gateway is asked. A gateway answers a relayed cancel from its own table
only, so a request never travels further (no loops), and its reply says only that it was
read, not whether the key was known.

Random keys cost an attacker nothing and would each cost a link per gateway, so the work is
bounded: relays at `RELAY_RATE` a second (burst `RELAY_BURST`), at most `MAX_RELAYS` at once,
`PEER_CONCURRENCY` links open per relay, each within links.LINK_TIMEOUT. Beyond that a
request is dropped; the client learns nothing either way, as from Postgres."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from gateway.rates import TokenBucket
from gateway.wire import link
from gateway.wire import protocol as p
from gateway.wire.link import Reply, Request

from .cancel import CancelTable, gateway_of
from .links import Link, LinkUnreachable
from .peers import Peers, gateway_number

log = logging.getLogger("pgsni.cancel")

RELAY_RATE = 20.0  # relayed cancel requests a second, at most
RELAY_BURST = 40
MAX_RELAYS = 8  # relays in flight at once
PEER_CONCURRENCY = 8  # links one relay opens at once

Ask = Callable[[str, Request], Awaitable[Reply]]  # (peer address, request) -> reply


class CancelRelay:
    """`CancelTable.elsewhere`: send a CancelRequest to the gateways that may have issued it."""

    def __init__(self, peers: Peers, ask: Ask, *, bucket: TokenBucket | None = None) -> None:
        self.peers, self.ask = peers, ask
        self.bucket = bucket or TokenBucket(RELAY_RATE, RELAY_BURST)
        self.in_flight = 0
        self.asked = 0  # links opened (tests)

    async def __call__(self, request: p.CancelRequest) -> str:
        if self.in_flight >= MAX_RELAYS or self.bucket.reserve(0) is None:
            log.debug("cancel request with an unknown key dropped: relaying is at its limit")
            return "dropped"
        self.in_flight += 1
        try:
            targets = await self._targets(gateway_of(request.secret))
            if not targets:
                log.debug("cancel request with an unknown key ignored: no other live gateway")
                return "unknown"
            await self._ask_all(targets, link.cancel_request(request))
            return "relayed"
        finally:
            self.in_flight -= 1

    async def _targets(self, number: int) -> list[str]:
        """Addresses of the gateways to ask: those of `number` (read the list afresh once if
        none has it: the issuer may be newer than the list), else all."""
        others = await self.peers.others()
        if number:
            for fresh in (False, True):
                if fresh:
                    others = await self.peers.others(max_age=0)
                issuers = [g.address for g in others if gateway_number(g.holder) == number]
                if issuers:
                    return issuers
        return [g.address for g in others]

    async def _ask_all(self, addresses: list[str], request: Request) -> None:
        gate = asyncio.Semaphore(PEER_CONCURRENCY)

        async def one(address: str) -> None:
            async with gate:
                self.asked += 1
                try:
                    await self.ask(address, request)
                except LinkUnreachable as e:
                    log.warning("relaying a cancel request failed: %s", e)

        await asyncio.gather(*(one(a) for a in addresses))


def answer_relayed(table: CancelTable) -> Callable[[Request, Link], Awaitable[Reply]]:
    """The link handler of kind cancel: this gateway's own keys only, and the same reply
    whether the key was known or not."""

    async def handle(request: Request, peer: Link) -> Reply:
        if peer.rest:
            raise link.LinkError("a cancel request carries no stream, but bytes followed it")
        found = await table.cancel_here(link.cancel_payload(request.payload))
        log.debug("relayed cancel request: %s", "sent to its backend" if found else "not a key of this gateway")
        return Reply()

    return handle
