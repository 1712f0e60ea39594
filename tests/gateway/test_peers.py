"""The directory of live peers (gateway/proxy/peers.py) on the in-memory store of
tests/storage/fake_store.py, and the gateway numbers of long cancel keys."""

from __future__ import annotations

import logging
import socket

import pytest

from gateway.config import Settings
from gateway.proxy.cancel_fleet import CancelRelay
from gateway.proxy.forward import Forwarding
from gateway.proxy.local_links import local_address
from gateway.proxy.peers import Peers, gateway_number
from gateway.wire import protocol as p
from storage.heartbeats import Heartbeat

from ..storage.fake_store import FakeBackend, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put_beat(store: Store, holder: str, expires: float, address: str = "", local: str = "") -> None:
    store.objects[f"gateways/{holder}.json"] = (Heartbeat(holder, expires, 60, address, {}, local).encode(), holder, 0)


def test_gateway_numbers_are_stable_and_never_zero():
    assert gateway_number("gw-a") == gateway_number("gw-a") != gateway_number("gw-b")
    assert all(1 <= gateway_number(f"gw-{i}") <= 0xFFFF for i in range(2000))


async def test_others_are_live_addressed_gateways_but_this_one_read_at_most_every_few_seconds():
    clock = Clock()
    store = Store(clock)
    put_beat(store, "gw-a", 1060, "10.0.0.1:5433")  # this gateway
    put_beat(store, "gw-b", 1060, "10.0.0.2:5433")
    put_beat(store, "gw-old", 1060)  # an older gateway: no links
    put_beat(store, "gw-dead", 999, "10.0.0.4:5433")
    backend = FakeBackend(store)
    peers = Peers(backend, lambda: "gw-a", clock=clock, monotonic=clock)
    assert [g.holder for g in await peers.others()] == ["gw-b"]
    put_beat(store, "gw-c", 1060, "10.0.0.3:5433")
    assert [g.holder for g in await peers.others()] == ["gw-b"]  # cached
    clock.now += 2
    assert [g.holder for g in await peers.others()] == ["gw-b", "gw-c"]
    put_beat(store, "gw-d", 1060, "10.0.0.5:5433")
    clock.now += 0.4
    assert len(await peers.others(max_age=0)) == 2  # not read again within MIN_READ_INTERVAL
    clock.now += 0.1
    assert len(await peers.others(max_age=0)) == 3
    backend.partition()
    clock.now += 2
    assert len(await peers.others(max_age=0)) == 3  # storage down: the last list


async def test_a_shared_number_is_logged(caplog, monkeypatch):
    clock = Clock()
    store = Store(clock)
    put_beat(store, "gw-b", 1060, "10.0.0.2:5433")
    monkeypatch.setattr("gateway.proxy.peers.gateway_number", lambda holder: 7)
    with caplog.at_level(logging.WARNING, "pgsni.peers"):
        await Peers(FakeBackend(store), lambda: "gw-a", clock=clock, monotonic=clock).others()
    assert "gw-a and gw-b share cancel key number 7" in caplog.text


async def test_a_worker_of_this_machine_is_reached_by_its_local_channel_the_rest_by_network(tmp_path):
    """Workers with links publish both; a peer's local channel is used only by a worker of the
    same machine (its channel in this worker's channel directory), everyone else links."""
    clock = Clock()
    store = Store(clock)
    mine, theirs = tmp_path / "w", tmp_path / "other-w"
    put_beat(store, "gw-m-1", 1060, "10.0.0.1:7001", local_address(mine / "1.sock"))
    put_beat(store, "gw-n", 1060, "10.0.0.1:7100", local_address(theirs / "0.sock"))  # another supervisor
    put_beat(store, "gw-far", 1060, "10.0.0.2:7000", f"local:not-{socket.gethostname()}:{mine}/2.sock")
    put_beat(store, "gw-s", 1060, "10.0.0.3:7000")
    worker = Peers(FakeBackend(store), lambda: "gw-m", clock=clock, monotonic=clock, channel_dir=mine)
    assert {g.holder: g.address for g in await worker.others()} == {
        "gw-m-1": local_address(mine / "1.sock"), "gw-n": "10.0.0.1:7100", "gw-far": "10.0.0.2:7000",
        "gw-s": "10.0.0.3:7000"}
    single = Peers(FakeBackend(store), lambda: "gw-s", clock=clock, monotonic=clock)
    assert {g.holder: g.address for g in await single.others()} == {
        "gw-m-1": "10.0.0.1:7001", "gw-n": "10.0.0.1:7100", "gw-far": "10.0.0.2:7000"}


async def test_a_channel_outside_this_workers_channel_directory_is_no_address(tmp_path):
    """A datagram crosses no TLS, so a `local:` address is trusted only in this worker's own
    channel directory (0700, its supervisor's). Anyone who can write a heartbeat to the bucket
    could publish `local:<this host>:<a socket a local user bound>`: neither a worker nor a
    single gateway may pass that socket a client or a cancel key."""
    clock = Clock()
    store = Store(clock)
    mine, evil = tmp_path / "w", tmp_path / "evil.sock"
    put_beat(store, "gw-m-1", 1060, local_address(mine / "1.sock"))  # a sibling worker without links
    put_beat(store, "gw-x", 1060, local_address(evil))  # forged: a channel as its address
    put_beat(store, "gw-y", 1060, "10.0.0.9:7000", local_address(evil))  # forged beside a network one
    worker = Peers(FakeBackend(store), lambda: "gw-m", clock=clock, monotonic=clock, channel_dir=mine)
    assert {g.holder: g.address for g in await worker.others()} == {
        "gw-m-1": local_address(mine / "1.sock"), "gw-y": "10.0.0.9:7000"}
    single = Peers(FakeBackend(store), lambda: "gw-s", clock=clock, monotonic=clock)
    assert {g.holder: g.address for g in await single.others()} == {"gw-y": "10.0.0.9:7000"}

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:  # the local user's socket
        listener.bind(str(evil))
        listener.setblocking(False)
        forwarding = Forwarding(Settings(), None, single, None, lambda db_id: False)
        relay = CancelRelay(single, forwarding.ask)
        await relay(p.CancelRequest(1234, b"abcd"))  # an unknown key goes to every live gateway
        with pytest.raises(BlockingIOError):
            listener.recv(4096)
