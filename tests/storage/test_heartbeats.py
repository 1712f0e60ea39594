"""Heartbeats carry a gateway's address and load (storage/heartbeats.py), and the fleet is read
from them; on the in-memory store of tests/storage/fake_store.py with a fake clock."""

from __future__ import annotations

import json

import pytest

from storage.heartbeats import Heartbeat, live_gateways

from .fake_store import FakeBackend
from .test_leases import clock, make, store  # noqa: F401  (fixtures)


async def test_a_publishing_gateway_beats_with_its_address_and_load_while_holding_nothing(store, clock):
    a = make(store, clock, "gw-a")
    await a.keep_alive(on_expired=None)
    assert "gateways/gw-a.json" not in store.objects  # no links, nothing held: no heartbeat
    a.advertise = lambda: ("10.0.0.1:5433", {"running": 2, "max": 50})
    await a.keep_alive(on_expired=None)
    beat = json.loads(store.objects["gateways/gw-a.json"][0])
    assert beat == {"holder": "gw-a", "expires": clock.now + 60, "ttl": 60,
                    "address": "10.0.0.1:5433", "load": {"running": 2, "max": 50}}


async def test_live_gateways_lists_unexpired_heartbeats_old_and_new(store, clock):
    a, b, c = make(store, clock, "gw-a"), make(store, clock, "gw-b"), make(store, clock, "gw-c")
    a.advertise = lambda: ("10.0.0.1:5433", {"running": 0, "max": 50})
    await a.beat()
    await b.beat()  # an older gateway's heartbeat: no address, no load
    await c.beat()
    clock.now += 30
    await a.beat()
    store.objects["gateways/broken.json"] = (b"{not json", "x", clock.now)
    store.objects["gateways/other.txt"] = (b"{}", "y", clock.now)
    clock.now += 31  # b's and c's expired, a's not
    await c.beat()
    found = await live_gateways(FakeBackend(store), clock.now)
    assert [g.holder for g in found] == ["gw-a", "gw-c"]
    assert found[0] == Heartbeat("gw-a", clock.now + 29, 60, "10.0.0.1:5433", {"running": 0, "max": 50})
    assert (found[1].address, found[1].load) == ("", {})


def test_an_old_heartbeat_is_read_with_no_address():
    beat = Heartbeat.decode(b'{"holder": "gw-old", "expires": 12.5}', 60.0)
    assert beat == Heartbeat("gw-old", 12.5, 60.0)


def test_a_worker_with_links_publishes_its_local_channel_beside_its_address():
    beat = Heartbeat("gw-m-1", 12.5, 60.0, "10.0.0.1:5434", {"running": 1, "max": 5}, "local:host:/tmp/w/1.sock")
    assert json.loads(beat.encode())["local"] == "local:host:/tmp/w/1.sock"
    assert Heartbeat.decode(beat.encode(), 60.0) == beat
    assert "local" not in json.loads(Heartbeat("gw-a", 12.5, 60.0, "10.0.0.1:5433").encode())
    assert Heartbeat.decode(b'{"expires": 12.5, "address": "10.0.0.1:5433", "local": 3}', 60.0).local == ""


async def test_leases_publish_the_local_channel_they_are_given(store, clock):
    a = make(store, clock, "gw-a")
    a.advertise = lambda: ("10.0.0.1:5433", {"running": 0, "max": 50})
    a.advertise_local = "local:host:/tmp/w/0.sock"
    await a.beat()
    assert json.loads(store.objects["gateways/gw-a.json"][0])["local"] == "local:host:/tmp/w/0.sock"


def test_odd_link_fields_never_make_a_heartbeat_unreadable():
    """The leases judge takeovers by a heartbeat: a strange address or load must not turn a
    live holder's heartbeat into "no proof of life"."""
    beat = Heartbeat.decode(b'{"expires": 12.5, "address": 7, "load": {"running": "x", "max": 5}}', 60.0)
    assert beat == Heartbeat("", 12.5, 60.0, "", {"max": 5})
    with pytest.raises(ValueError, match="damaged"):
        Heartbeat.decode(b'{"holder": "gw-a"}', 60.0)
