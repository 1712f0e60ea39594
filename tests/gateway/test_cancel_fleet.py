"""Relaying cancel requests to other gateways (gateway/proxy/cancel_fleet.py): whom a key is
sent to, and the bounds on the work random keys can cause. Peers and links are stand-ins."""

from __future__ import annotations

import asyncio

from gateway.proxy import cancel_fleet
from gateway.proxy.cancel import LONG_KEY_VERSION
from gateway.proxy.cancel_fleet import CancelRelay
from gateway.proxy.links import LinkUnreachable
from gateway.proxy.peers import gateway_number
from gateway.rates import TokenBucket
from gateway.wire import link
from gateway.wire import protocol as p
from storage.heartbeats import Heartbeat


class FakePeers:
    def __init__(self, *names: str) -> None:
        self.live = [Heartbeat(n, 0, 60, f"{n}:5433") for n in names]
        self.reads: list[float] = []

    async def others(self, max_age: float = 2.0) -> list[Heartbeat]:
        self.reads.append(max_age)
        return list(self.live)


def long_key(issuer: str) -> p.CancelRequest:
    number = gateway_number(issuer).to_bytes(2, "big")
    return p.CancelRequest(42, bytes([LONG_KEY_VERSION]) + number + bytes(29))


def relay_with(peers, fail=(), hold: asyncio.Event | None = None, **kw) -> tuple[CancelRelay, list]:
    asked = []

    async def ask(address: str, request: link.Request) -> link.Reply:
        asked.append(address)
        assert link.cancel_payload(request.payload).pid == 42
        if hold is not None:
            await hold.wait()
        if address in fail:
            raise LinkUnreachable(f"gateway {address} did not answer")
        return link.Reply()

    return CancelRelay(peers, ask, **kw), asked


async def test_a_short_key_is_asked_of_every_live_gateway():
    relay, asked = relay_with(FakePeers("gw-b", "gw-c"), fail=("gw-b:5433",))
    assert await relay(p.CancelRequest(42, b"abcd")) == "relayed"  # one peer failing is logged
    assert sorted(asked) == ["gw-b:5433", "gw-c:5433"]


async def test_a_long_key_goes_to_its_issuer_only():
    relay, asked = relay_with(FakePeers("gw-b", "gw-c"))
    assert await relay(long_key("gw-c")) == "relayed"
    assert asked == ["gw-c:5433"]


async def test_an_issuer_missing_from_the_list_is_looked_for_afresh_then_all_are_asked():
    peers = FakePeers("gw-b", "gw-c")
    relay, asked = relay_with(peers)
    assert await relay(long_key("gw-new")) == "relayed"
    assert peers.reads == [2.0, 0]  # the cached list, then storage at once
    assert sorted(asked) == ["gw-b:5433", "gw-c:5433"]


async def test_no_other_gateway_means_unknown():
    relay, asked = relay_with(FakePeers())
    assert await relay(p.CancelRequest(42, b"abcd")) == "unknown" and asked == []


async def test_relays_beyond_the_rate_are_dropped():
    now = [0.0]
    relay, asked = relay_with(FakePeers("gw-b"), bucket=TokenBucket(1.0, 2, clock=lambda: now[0]))
    results = [await relay(p.CancelRequest(42, b"abcd")) for _ in range(5)]
    assert results == ["relayed", "relayed", "dropped", "dropped", "dropped"] and len(asked) == 2
    now[0] += 1.0
    assert await relay(p.CancelRequest(42, b"abcd")) == "relayed"


async def test_relays_in_flight_are_bounded_and_so_are_links_per_relay():
    hold = asyncio.Event()
    names = [f"gw-{i}" for i in range(cancel_fleet.PEER_CONCURRENCY + 4)]
    relay, asked = relay_with(FakePeers(*names), hold=hold, bucket=TokenBucket(0, 1))
    first = [asyncio.create_task(relay(p.CancelRequest(42, b"abcd"))) for _ in range(cancel_fleet.MAX_RELAYS)]
    await asyncio.sleep(0.01)
    assert len(asked) == cancel_fleet.MAX_RELAYS * cancel_fleet.PEER_CONCURRENCY  # the rest wait
    assert await relay(p.CancelRequest(42, b"abcd")) == "dropped"  # one too many: not queued
    hold.set()
    assert await asyncio.gather(*first) == ["relayed"] * cancel_fleet.MAX_RELAYS
    assert len(asked) == cancel_fleet.MAX_RELAYS * len(names)
