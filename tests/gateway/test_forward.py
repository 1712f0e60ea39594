"""Where a client belongs (gateway/proxy/forward.py Forwarding.holder_elsewhere): here unless
another live gateway with an address holds its database; anything unclear serves it here.
Fakes for the lease store and the heartbeats; the links themselves are tested end to end
(tests/e2e/test_forward_fleet.py)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.proxy.forward import HOLDER_CACHE_SECONDS, Forwarding
from gateway.proxy.links import LinkUnreachable
from gateway.proxy.local_links import local_address
from gateway.wire import link as wire
from gateway.wire import protocol as p
from storage.errors import StorageUnavailable
from storage.heartbeats import Heartbeat


class FakeLeases:
    enabled, holder = True, "me"

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.owners: dict[str, str] = {}
        self.reads = 0
        self.down = False

    async def holder_of(self, db_id: str) -> str | None:
        self.reads += 1
        if self.down:
            raise StorageUnavailable("storage is down")
        return self.owners.get(db_id)


class FakePeers:
    def __init__(self, *beats: Heartbeat) -> None:
        self.beats = list(beats)

    async def others(self, max_age: float = 2.0) -> list[Heartbeat]:
        return [b for b in self.beats if b.address]


@pytest.fixture
def parts(monkeypatch):
    leases, peers, running = FakeLeases(), FakePeers(Heartbeat("gw-b", 2e9, 60, "10.0.0.2:7000"),
                                                     Heartbeat("gw-old", 2e9, 60)), set()
    settings = Settings(domains=["db.example.com"], remote_routes={"ext": {"host": "pg.example.com"}})
    clock = [1000.0]
    monkeypatch.setattr("gateway.proxy.forward.time.monotonic", lambda: clock[0])
    fwd = Forwarding(settings, leases, peers, ssl.create_default_context(), running.__contains__)
    return fwd, leases, running, clock


async def test_a_database_held_by_a_live_peer_goes_there(parts):
    fwd, leases, _, _ = parts
    leases.owners["app1"] = "gw-b"
    assert await fwd.holder_elsewhere("app1.db.example.com") == "10.0.0.2:7000"
    assert await fwd.holder_elsewhere("APP1.DB.EXAMPLE.COM") == "10.0.0.2:7000"


@pytest.mark.parametrize("name, owner", [
    (None, "gw-b"),  # no SNI: named in the startup message, known only after TLS
    ("app1.other.example.org", "gw-b"),  # not our domain: the session refuses it
    ("bad_id!.db.example.com", "gw-b"),  # not a valid id: the session refuses it
    ("ext.db.example.com", "gw-b"),  # a remote route: served by its external Postgres from here
    ("app1.db.example.com", None),  # free: claimed here
    ("app1.db.example.com", "me"),  # ours
    ("app1.db.example.com", "gw-old"),  # its holder publishes no address (an older gateway)
    ("app1.db.example.com", "gw-dead"),  # its holder's heartbeat expired: taken over here
])
async def test_served_here(parts, name, owner):
    fwd, leases, _, _ = parts
    if owner:
        leases.owners["app1"] = leases.owners["ext"] = owner
    assert await fwd.holder_elsewhere(name) is None


async def test_held_or_running_here_reads_no_lease_and_storage_down_serves_here(parts):
    fwd, leases, running, _ = parts
    leases.owners["app1"] = leases.owners["app2"] = "gw-b"
    leases.held.add("app1")
    running.add("app2")
    assert await fwd.holder_elsewhere("app1.db.example.com") is None
    assert await fwd.holder_elsewhere("app2.db.example.com") is None
    assert leases.reads == 0
    leases.owners["app3"] = "gw-b"
    leases.down = True
    assert await fwd.holder_elsewhere("app3.db.example.com") is None


async def test_the_lease_is_read_at_most_once_a_second_per_database(parts):
    fwd, leases, _, clock = parts
    leases.owners["app1"] = "gw-b"
    for _ in range(5):
        assert await fwd.holder_elsewhere("app1.db.example.com") == "10.0.0.2:7000"
    assert leases.reads == 1
    leases.owners["app1"] = "me"  # moved here meanwhile
    clock[0] += HOLDER_CACHE_SECONDS
    assert await fwd.holder_elsewhere("app1.db.example.com") is None
    assert leases.reads == 2


DRAINING = {"running": 1, "max": 10, "draining": 1}


def _view(me: str, beats: list[Heartbeat], owner: str) -> Forwarding:
    """Gateway `me`'s Forwarding, with `beats` the fleet's heartbeats and `owner` holding app*."""
    leases = FakeLeases()
    leases.holder = me
    leases.owners = {f"app{i}": owner for i in range(40)}
    peers = FakePeers(*[b for b in beats if b.holder != me])
    return Forwarding(Settings(domains=["db.example.com"]), leases, peers, ssl.create_default_context(),
                      lambda db_id: False)


async def test_while_the_holder_drains_every_gateway_sends_a_database_to_one_successor():
    beats = [Heartbeat("gw-a", 2e9, 60, "10.0.0.1:7000", DRAINING),
             Heartbeat("gw-b", 2e9, 60, "10.0.0.2:7000"), Heartbeat("gw-c", 2e9, 60, "10.0.0.3:7000")]
    address = {b.holder: b.address for b in beats}
    views = {me: _view(me, beats, "gw-a") for me in ("gw-a", "gw-b", "gw-c")}
    views["gw-a"].draining = True
    chosen = []
    for i in range(40):
        name = f"app{i}.db.example.com"
        picks = {me: await view.holder_elsewhere(name) for me, view in views.items()}
        # None: "serve here", so the gateway it names is the asking one
        where = {me: next(g for g, a in address.items() if a == pick) if pick else me for me, pick in picks.items()}
        assert len(set(where.values())) == 1, (name, where)
        chosen.append(where["gw-b"])
    assert set(chosen) == {"gw-b", "gw-c"}  # spread over the gateways that stay, never the draining one


async def test_a_draining_gateway_sends_even_its_own_databases_elsewhere_and_none_to_another_drain():
    beats = [Heartbeat("gw-b", 2e9, 60, "10.0.0.2:7000", DRAINING), Heartbeat("gw-c", 2e9, 60, "10.0.0.3:7000")]
    view = _view("gw-a", beats, "gw-a")
    view.leases.held.add("app1")
    assert await view.holder_elsewhere("app1.db.example.com") is None  # not draining: served here
    view.draining = True
    assert await view.holder_elsewhere("app1.db.example.com") == "10.0.0.3:7000"
    # held by a live gateway that stays: it goes there, not to the database's successor
    view.peers.beats = beats + [Heartbeat("gw-e", 2e9, 60, "10.0.0.5:7000")]
    successor = await view.holder_elsewhere("app2.db.example.com")
    other = {"10.0.0.3:7000": "gw-e", "10.0.0.5:7000": "gw-c"}[successor]
    view.leases.owners["app2"] = other
    view.forget("app2")  # the lease read just now is cached
    assert await view.holder_elsewhere("app2.db.example.com") == {"gw-c": "10.0.0.3:7000", "gw-e": "10.0.0.5:7000"}[other]
    view.peers.beats = beats[:1]
    assert await view.holder_elsewhere("app1.db.example.com") is None  # nobody left: served (refused) here


async def test_a_full_gateway_places_a_free_database_on_the_least_loaded_gateway_with_room():
    beats = [Heartbeat("gw-b", 2e9, 60, "10.0.0.2:7000", {"running": 3, "max": 4}),
             Heartbeat("gw-c", 2e9, 60, "10.0.0.3:7000", {"running": 1, "max": 4}),
             Heartbeat("gw-d", 2e9, 60, "10.0.0.4:7000", {"running": 0, "max": 4, "draining": 1}),
             Heartbeat("gw-e", 2e9, 60, "10.0.0.5:7000", {"running": 2, "max": 2})]
    view = _view("gw-a", beats, "gw-x")
    view.leases.owners.clear()  # nobody holds anything
    full = [False]
    view._full = lambda: full[0]
    assert await view.holder_elsewhere("app1.db.example.com") is None  # room here: started here
    full[0] = True
    assert await view.holder_elsewhere("app1.db.example.com") == "10.0.0.3:7000"  # not the draining one
    view.peers.beats = [beats[3]]
    assert await view.holder_elsewhere("app1.db.example.com") is None  # nobody has room: refused here


async def test_a_damaged_load_in_a_heartbeat_is_no_room_not_a_failed_placement():
    """Heartbeats come from the bucket: a load without `running`, or with numbers no gateway
    publishes, must not fail the placement of every client of a full gateway."""
    beats = [Heartbeat("gw-b", 2e9, 60, "10.0.0.2:7000", {"max": 4}),
             Heartbeat("gw-c", 2e9, 60, "10.0.0.3:7000", {"running": -1, "max": 0}),
             Heartbeat("gw-d", 2e9, 60, "10.0.0.4:7000", {"running": 3, "max": 4})]
    view = _view("gw-a", beats, "gw-x")
    view.leases.owners.clear()
    view._full = lambda: True
    assert await view.holder_elsewhere("app1.db.example.com") == "10.0.0.4:7000"
    view.peers.beats = beats[:2]
    assert await view.holder_elsewhere("app1.db.example.com") is None



async def test_each_target_gets_its_path_and_a_worker_without_links_never_opens_one():
    """One Forwarding for both paths: a worker's channel (`local:`) is sent a datagram, a
    HOST:PORT gets a link, which a worker without advertise_address has none of."""
    fwd = Forwarding(Settings(), FakeLeases(), FakePeers(), None, lambda db_id: False)
    cancel = wire.cancel_request(p.CancelRequest(1, b"abcd"))
    with pytest.raises(LinkUnreachable, match="is on a link, and this gateway has none"):
        await fwd.ask("10.0.0.2:7000", cancel)
    with socket.socket() as client:
        with pytest.raises(LinkUnreachable, match="has none"):
            await fwd.hand_over(client, "10.0.0.2:7000", "10.0.0.9:1234", True, bytes(32))
    channel = Path(tempfile.mkdtemp(prefix="pgsni-f-", dir="/tmp")) / "1.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as worker:
            worker.bind(str(channel))
            assert await fwd.ask(local_address(channel), cancel) == wire.Reply()
            reader = wire.LinkReader()
            reader.receive_data(worker.recv(4096))
            assert reader.next_message() == cancel
    finally:
        shutil.rmtree(channel.parent)
    assert fwd.forwarded == 0


async def test_a_malformed_address_in_a_heartbeat_is_an_unreachable_peer_on_every_path():
    """A heartbeat in the bucket names an address that is not HOST:PORT: forwarding serves the
    client here, and a relayed cancel skips that gateway (its other asks go on); neither
    fails with a configuration error."""
    fwd = Forwarding(Settings(), FakeLeases(), FakePeers(), ssl.create_default_context(), lambda db_id: False)
    with pytest.raises(LinkUnreachable, match="not HOST:PORT"):
        await fwd.ask("no-port-here", wire.cancel_request(p.CancelRequest(1, b"abcd")))
    with socket.socket() as client:
        with pytest.raises(LinkUnreachable, match="not HOST:PORT"):
            await fwd.hand_over(client, "no-port-here", "10.0.0.9:1234", True, bytes(32))


async def test_storage_too_slow_to_say_where_a_database_is_held_serves_the_client_here(caplog):
    """Reading the lease (or the heartbeats) may take the storage client's whole retry budget,
    far beyond handshake_timeout: the decision gets a part of the handshake only, so the
    client is served here (57P03 at worst) instead of being dropped without a word when its
    handshake runs out."""
    leases = FakeLeases()
    fwd = Forwarding(Settings(domains=["db.example.com"], handshake_timeout=1.5), leases,
                     FakePeers(Heartbeat("gw-b", 2e9, 60, "10.0.0.2:7000")), ssl.create_default_context(),
                     lambda db_id: False)
    never = asyncio.Event()

    async def hangs(db_id: str) -> str | None:
        await never.wait()
        return "gw-b"

    leases.holder_of = hangs
    began = time.monotonic()
    taken = await asyncio.wait_for(fwd.link_for(
        "client 192.0.2.7:5000 for app1.db.example.com", lambda fresh: fwd.holder_elsewhere("app1.db.example.com", fresh),
        lambda address: pytest.fail(f"taken to {address}")), 5.0)
    assert taken is None and time.monotonic() - began < 1.0
    assert "storage did not say" in caplog.text


async def test_a_forwarded_connection_reset_before_its_hello_is_closed_by_the_holder(tmp_path):
    """Once a bare link's reply is sent its socket is the forward handler's (links.py does not
    close it); a connection reset before the ClientHello (the forwarder's machine restarted,
    say) must still close it, not leave it to the garbage collector."""
    from certs.cluster import link_client_context, link_server_context, make_cluster
    from gateway.proxy.bare_link import BARE, HandTLS
    from gateway.proxy.links import LinkServer
    from gateway.proxy.sockets import connect_tcp

    from ..support.ports import free_port

    cluster = make_cluster(tmp_path / "cluster", ["gw-a", "gw-b"], days=1)
    fwd = Forwarding(Settings(), FakeLeases(), FakePeers(), None, lambda db_id: False)
    handle = fwd.handler(lambda sock, peer, direct: pytest.fail("served"))
    taken: asyncio.Queue = asyncio.Queue()

    async def recording(request, link):
        taken.put_nowait(link.sock)
        return await handle(request, link)

    server = LinkServer(f"127.0.0.1:{free_port()}", link_server_context(cluster.ca, *cluster.members["gw-a"]), {}, 5.0,
                        bare_handlers={wire.Kind.FORWARD: recording})
    await server.open()
    try:
        sock = await connect_tcp("127.0.0.1", server.port)
        with sock:
            await asyncio.get_running_loop().sock_sendall(sock, BARE)
            tls = HandTLS(sock, link_client_context(cluster.ca, *cluster.members["gw-b"]), server_side=False)
            await tls.handshake()
            await tls.send(wire.forward_request(wire.Forwarded("192.0.2.1:5432", True, bytes(32))))
            assert await tls.read_message() == wire.Reply()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        held = await asyncio.wait_for(taken.get(), 5)  # closed with a reset
        for _ in range(100):
            if held.fileno() == -1:
                break
            await asyncio.sleep(0.02)
        assert held.fileno() == -1
    finally:
        await server.close()
