"""Forwarding to the holder (issue 17): three gateways on one moto bucket with links between
them. A client of a database that gateway A holds reaches B or C (as behind a load
balancer): its untouched TLS goes to A over the link, and A serves it. Real clients, real
TLS, SCRAM with channel binding, direct TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time

import psycopg
import pytest

from certs.cluster import link_client_context, make_cluster
from gateway.proxy.bare_link import BARE, HandTLS
from gateway.proxy.peers import REFRESH_SECONDS
from gateway.proxy.sockets import connect_tcp
from gateway.wire import link
from gateway.wire import protocol as p

from ..support.harness import conninfo
from ..support.tcpproxy import TCPProxy
from .test_cancel_fleet import cluster_dir, fleet, link_requests, send_raw  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def connect(gt, tls, db: str = "app1", **extra) -> psycopg.Connection:
    return psycopg.connect(conninfo(gt.port, tls["ca"], db, **extra), autocommit=True)


def test_clients_through_any_gateway_reach_the_holder_and_see_the_same_data(fleet, tls):
    a, b, c = fleet
    a.create_db("app1")
    with connect(a, tls) as on_a:
        on_a.execute("CREATE TABLE t (id int PRIMARY KEY, via text)")
        on_a.execute("INSERT INTO t VALUES (1, 'a')")
        pid_a = on_a.info.backend_pid
        with connect(b, tls, channel_binding="require") as on_b, connect(c, tls) as on_c:
            on_b.execute("INSERT INTO t VALUES (2, 'b')")
            on_c.execute("INSERT INTO t VALUES (3, 'c')")
            rows = {gt: conn.execute("SELECT id, via FROM t ORDER BY id").fetchall()
                    for gt, conn in (("a", on_a), ("b", on_b), ("c", on_c))}
            # the sessions run on A's instance: their pids are backends there
            pids = {r[0] for r in on_a.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchall()}
            assert {on_b.info.backend_pid, on_c.info.backend_pid} <= pids
            assert on_b.pgconn.used_password and on_b.info.parameter_status("server_version")
    assert rows["a"] == rows["b"] == rows["c"] == [(1, "a"), (2, "b"), (3, "c")]
    assert pid_a in pids
    assert b.gw.fleet.forwarding.forwarded == 1 and c.gw.fleet.forwarding.forwarded == 1
    assert a.gw.fleet.forwarding.served == 2 and a.gw.fleet.forwarding.forwarded == 0
    assert not b.gw.instances.instances and not c.gw.instances.instances  # nothing started there


def test_direct_tls_and_errors_are_the_holders(fleet, tls):
    a, b, _ = fleet
    a.create_db("app1")
    with connect(a, tls):
        with connect(b, tls, sslnegotiation="direct") as direct:
            assert direct.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(b, tls, password="wrong")
        with connect(b, tls) as conn, pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM missing")
    assert b.gw.fleet.forwarding.forwarded == 3


def test_a_database_nobody_holds_is_started_where_its_client_arrives(fleet, tls):
    a, b, _ = fleet
    a.create_db("app2")
    a.call(lambda: a.gw.instances.stop("app2"))
    deadline = time.monotonic() + 10
    while a.call(lambda: a.gw.instances.leases.holder_of("app2")) is not None:
        assert time.monotonic() < deadline, "A did not give the lease up"
        time.sleep(0.1)
    with connect(b, tls, "app2") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert b.gw.fleet.forwarding.forwarded == 0 and "app2" in b.gw.instances.instances


def test_a_holder_that_takes_no_links_leaves_its_clients_served_where_they_arrive(fleet, tls, caplog):
    """The link to the holder fails (its internal listener is gone): the client is served
    where it arrived, which gives what a gateway gave before forwarding: 57P03, the database
    is open on another gateway."""
    a, b, _ = fleet
    a.create_db("app1")
    a.call(lambda: a.gw.instances.stop("app1"))  # saved: every gateway knows it from storage
    with connect(a, tls):
        a.call(a.gw.fleet.servers[0].close)
        with pytest.raises(psycopg.OperationalError, match="another gateway"):
            connect(b, tls)
    assert b.gw.fleet.forwarding.forwarded == 0
    assert "served here" in caplog.text


def test_the_clients_own_tls_crosses_the_link_bare(fleet, tls):
    """The link's TLS authenticates the forward request (strangers are refused: see
    test_cancel_fleet.py); after the holder's reply the client's own TLS crosses the link
    bare, not encrypted a second time: its ClientHello's server name is readable there."""
    a, b, _ = fleet
    a.create_db("app1")
    on_the_link = TCPProxy(int(a.gw.fleet.address.rpartition(":")[2]), record=True)
    try:
        a.gw.fleet.address = f"127.0.0.1:{on_the_link.port}"  # B reaches A through it
        a.call(a.gw.fleet.leases.beat)
        time.sleep(REFRESH_SECONDS + 0.2)  # B reads the heartbeats again
        with connect(a, tls), connect(b, tls) as forwarded:
            assert forwarded.execute("SELECT 1").fetchone() == (1,)
        assert b.gw.fleet.forwarding.forwarded == 1
        sent = b"".join(on_the_link.recorded)
        assert sent[:3] == BARE + b"\x16\x03"  # the link's own TLS first
        assert b"app1.db.example.com" in sent  # then the client's ClientHello, in the clear
    finally:
        on_the_link.close()


def test_a_bare_link_takes_only_members_and_only_forward_requests(fleet, cluster_dir, tmp_path):
    """Bare links are authenticated as every link is, and carry nothing but forwarded
    clients; a forward request must come on one."""
    a = fleet[0]
    as_b = link_client_context(cluster_dir / "ca.pem", cluster_dir / "gw-b.pem", cluster_dir / "gw-b-key.pem")
    forward = link.forward_request(link.Forwarded("192.0.2.1:5432", True, bytes(32)))
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cafile=str(cluster_dir / "ca.pem"))
    no_cert.check_hostname = False
    other = make_cluster(tmp_path / "other", ["gw-b"], days=1)  # a stranger's CA, a member's name
    stranger = link_client_context(other.ca, *other.members["gw-b"])
    stranger.verify_mode = ssl.CERT_NONE
    for context in (no_cert, stranger):
        try:
            reply = send_raw(a, context, forward.encode(), bare=True)
        except (ssl.SSLError, ConnectionError):
            reply = None
        assert reply is None  # refused at the handshake: not a byte of an answer
    assert a.gw.fleet.forwarding.served == 0

    cancel = link.cancel_request(p.CancelRequest(1, b"abcd"))
    for data, bare, reason in (
            (cancel.encode(), True, "does not serve cancel requests on this kind of link"),
            (forward.encode(), False, "does not serve forward requests on this kind of link"),
            (forward.encode() + b"\x16\x03", True, "bytes after a request before its reply"),
            (link.forward_request(link.Forwarded("192.0.2.1:5432", True)).encode(), True,
             "names the client's ClientHello"),
            (link.Reply().encode(), True, "opens with a request, not a reply")):
        reply = send_raw(a, as_b, data, bare=bare)
        assert reply is not None and reply.status is link.Status.REFUSED and reason in reply.text, reply
    assert [link_requests(a, kind, "refused") for kind in ("forward", "cancel", "invalid")] == [2, 1, 2]
    assert a.gw.fleet.forwarding.served == 0


def _client_hello(server_name: str) -> bytes:
    """A real ClientHello for `server_name` (each one differs: its random)."""
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                               server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def test_a_clienthello_put_on_a_bare_link_by_someone_else_is_dropped(fleet, cluster_dir):
    """After the reply the link is plain TCP: someone able to inject into it could put a
    ClientHello of their own ahead of the client's, and be served as that client (its
    address: its limits, its log lines). The holder takes only the ClientHello whose SHA-256
    the forwarding gateway sent inside the link's TLS."""
    a = fleet[0]
    a.create_db("app1")
    as_b = link_client_context(cluster_dir / "ca.pem", cluster_dir / "gw-b.pem", cluster_dir / "gw-b-key.pem")
    port = int(a.settings.advertise_address.rpartition(":")[2])
    seen, injected = _client_hello("app1.db.example.com"), _client_hello("app1.db.example.com")

    async def forward_then_send(data: bytes) -> bytes:
        sock = await connect_tcp("127.0.0.1", port)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, BARE)
            tls = HandTLS(sock, as_b, server_side=False)
            await tls.handshake()
            await tls.send(link.forward_request(link.Forwarded("192.0.2.1:5432", True,
                                                               hashlib.sha256(seen).digest())))
            assert await tls.read_message() == link.Reply()
            await loop.sock_sendall(sock, data)
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 5), 10)
            except ConnectionError:
                return b""
        finally:
            sock.close()

    assert asyncio.run(forward_then_send(injected)) == b""  # dropped, no ServerHello
    assert asyncio.run(forward_then_send(seen))[:1] == b"\x16"  # the one it saw: TLS goes on


def test_a_holder_slow_to_start_tls_loses_no_byte_of_the_hello(fleet, tls):
    """The forwarder sends the ClientHello as soon as the holder accepted; a holder whose
    loop is busy begins its TLS later: the hello must wait for it, not be read by the link."""
    a, b, _ = fleet
    a.create_db("app1")
    handle = a.gw.listener._handle_client

    async def late(sock, peer, refusal, direct):
        if direct is not None:
            await asyncio.sleep(0.5)
        await handle(sock, peer, refusal, direct)

    a.gw.listener._handle_client = late
    with connect(a, tls), connect(b, tls) as forwarded:
        assert forwarded.execute("SELECT 1").fetchone() == (1,)
    assert b.gw.fleet.forwarding.forwarded == 1


def test_a_client_naming_its_database_in_options_is_handed_to_the_holder(fleet, tls):
    """No server name (connected by IP address), `options=endpoint=<id>`: the database is
    known only from the startup message, after TLS ended at B; B hands the session to A over
    a link, and A authenticates and serves it: SCRAM with channel binding (B's certificate, the
    fleet's one), A's backend pid, A's errors."""
    a, b, c = fleet
    a.create_db("app1")

    def by_options(gt, **extra):
        return psycopg.connect(conninfo(gt.port, tls["ca"], None, options="endpoint=app1", **extra),
                               autocommit=True)

    with connect(a, tls) as on_a:
        on_a.execute("CREATE TABLE t (id int)")
        with by_options(b, channel_binding="require") as on_b, by_options(c, max_protocol_version="3.2") as on_c:
            on_b.execute("INSERT INTO t VALUES (1)")
            on_c.execute("INSERT INTO t VALUES (2)")
            assert on_a.execute("SELECT count(*) FROM t").fetchone() == (2,)
            pids = {r[0] for r in on_a.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchall()}
            assert {on_b.info.backend_pid, on_c.info.backend_pid} <= pids
            assert on_b.execute("SELECT current_setting('pgsni.tls')").fetchone() == ("on",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            by_options(b, password="wrong")
        with by_options(b) as conn, pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM missing")
    assert b.gw.fleet.forwarding.forwarded == 3 and c.gw.fleet.forwarding.forwarded == 1
    assert not b.gw.instances.instances and not c.gw.instances.instances
