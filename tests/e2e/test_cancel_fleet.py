"""Cancel across gateways (issue 17): three gateways on 127.0.0.1 share one moto bucket, each
with an advertised address and cluster certificates from `pgsni certs cluster`. A session
runs on the database's holder; its CancelRequest, sent to another gateway (as a load
balancer would send the cancel's new connection anywhere), reaches it over the links. The
links refuse everyone without a cluster certificate, and a relayed cancel goes no further."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from certs.cluster import link_client_context, make_cluster
from certs.context import TLSConfigError
from gateway.cli.main import main as pgsni
from gateway.config import Settings
from gateway.proxy.bare_link import BARE
from gateway.proxy.links import LinkUnreachable, ask
from gateway.wire import link
from gateway.wire import protocol as p

from ..conftest import reachable_tmpdir, seed_template
from ..support.harness import TEST_PASSWORD, GatewayThread, conninfo
from ..support.ports import free_port
from ..support.rawclient import RawClient
from ..support.tcpproxy import TCPProxy

NAMES = ("gw-a", "gw-b", "gw-c")
CANCELLED = "canceling statement due to user request"


@pytest.fixture
def cluster_dir(tmp_path):
    out = CliRunner().invoke(pgsni, ["certs", "cluster", "--out", str(tmp_path / "cluster")]
                             + [arg for n in NAMES for arg in ("--name", n)])
    assert out.exit_code == 0, out.output
    return tmp_path / "cluster"


@pytest.fixture
def fleet(make_settings, template_pgdata, s3_settings, cluster_dir, fleet_settings):
    """Three gateways on one bucket, each with its own data root and links to the others."""
    started, roots = [], []
    for name in NAMES:
        root = reachable_tmpdir(f"pgsni-{name}-")
        seed_template(root, template_pgdata)
        roots.append(root)
        address = f"127.0.0.1:{free_port()}"
        base = make_settings(**s3_settings, **fleet_settings)
        settings = Settings(**{**base.__dict__, "data_root": str(root), "gateway_id": name,
                               "socket_dir": f"/tmp/pgsni-s-{root.name[-8:]}",
                               "advertise_address": address, "cluster_listen": address,
                               "cluster_ca": str(cluster_dir / "ca.pem"),
                               "cluster_cert": str(cluster_dir / f"{name}.pem"),
                               "cluster_key": str(cluster_dir / f"{name}-key.pem")})
        started.append(GatewayThread(settings).start())
    yield started
    for gt in started:
        gt.stop()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


CLIENT = """
import sys, threading, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    print("connected", flush=True)
    sys.stdin.readline()
    threading.Timer(0.5, getattr(conn, sys.argv[2])).start()
    try:
        conn.execute("select pg_sleep(30)")
        print("not cancelled")
    except psycopg.Error as e:
        print(e.sqlstate)
"""


@pytest.mark.parametrize("method, protocol, asked", [
    ("cancel", "3.0", 2),  # a 4-byte key names no gateway: both others are asked
    ("cancel", "3.2", 1),  # a long key names its issuer: only that one is asked
    ("cancel_safe", "3.2", 0),  # libpq 17+'s cancel over TLS names the database (SNI): the
    # whole connection is forwarded to its holder, which finds the key itself
])
def test_a_cancel_reaching_another_gateway_cancels_the_query(fleet, tls, method, protocol, asked):
    """The client reaches gateways through one address (a proxy standing for a load balancer):
    its session lands on A, the holder; its cancel's new connection lands on B."""
    a, b, c = fleet
    a.create_db("app1")
    balancer = TCPProxy(a.port)
    try:
        dsn = conninfo(balancer.port, tls["ca"], "app1", max_protocol_version=protocol)
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, dsn, method], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "connected\n", proc.stderr.read()
        assert len(a.gw.cancels) == 1
        balancer.target = ("127.0.0.1", b.port)  # new connections now reach B
        out, err = proc.communicate("go\n", timeout=20)
    finally:
        balancer.close()
    assert out == "57014\n", err
    assert b.gw.fleet.relay.asked == asked
    assert b.gw.fleet.forwarding.forwarded == (asked == 0)
    assert a.gw.fleet.relay.asked == c.gw.fleet.relay.asked == 0  # a relayed cancel goes no further


def session_on(gt, ca, minor: int = 0) -> tuple[RawClient, p.BackendKeyData]:
    raw = RawClient(gt.port)
    raw.start_tls(str(ca), "app1.db.example.com")
    raw.startup({"user": "postgres", "database": "postgres"}, minor=minor)
    raw.scram("postgres", TEST_PASSWORD)
    key = None
    while not isinstance(msg := raw.next_backend(), p.ReadyForQuery):
        key = msg if isinstance(msg, p.BackendKeyData) else key
    assert key is not None
    return raw, key


def link_ask(gt, context: ssl.SSLContext, request: link.Request, address: str | None = None) -> link.Reply:
    return asyncio.run(ask(context, address or gt.settings.advertise_address, request))


def not_cancelled(raw: RawClient) -> bool:
    return raw.rows("select pg_sleep(0.5), 'not cancelled'") == [["", "not cancelled"]]


def test_a_peer_without_a_cluster_certificate_is_refused_at_the_handshake(fleet, tls, tmp_path):
    a = fleet[0]
    a.create_db("app1")
    raw, key = session_on(a, tls["ca"])
    request = link.cancel_request(p.CancelRequest(key.pid, key.secret))  # the right key, even
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cafile=a.settings.cluster_ca)
    no_cert.check_hostname = False
    other = make_cluster(tmp_path / "other", ["gw-a"], days=1)  # a stranger's CA, a member's name
    stranger = link_client_context(other.ca, *other.members["gw-a"])
    stranger.verify_mode = ssl.CERT_NONE  # it would not trust our server either; let it try
    public_tls = ssl.create_default_context(cafile=str(tls["ca"]))  # the clients' side of trust
    public_tls.check_hostname = False
    public_tls.load_cert_chain(str(tls["cert"]), str(tls["key"]))
    for context in (no_cert, stranger, public_tls):
        with pytest.raises(LinkUnreachable, match="CERTIFICATE|certificate|alert|closed|reset"):
            link_ask(a, context, request)
    assert not_cancelled(raw)
    raw.close()


def test_a_relayed_cancel_for_an_unknown_key_does_nothing_and_goes_no_further(fleet, tls, cluster_dir):
    a, b, c = fleet
    a.create_db("app1")
    raw, key = session_on(a, tls["ca"])
    as_c = link_client_context(cluster_dir / "ca.pem", cluster_dir / "gw-c.pem", cluster_dir / "gw-c-key.pem")
    wrong = link_ask(a, as_c, link.cancel_request(p.CancelRequest(key.pid, bytes(4))))
    unknown = link_ask(a, as_c, link.cancel_request(p.CancelRequest(key.pid + 1, key.secret)))
    assert wrong == unknown == link.Reply()  # the same answer as for a known key, below
    assert not_cancelled(raw)
    assert a.gw.fleet.relay.asked == 0  # not relayed again: no loops
    assert link_requests(a, "cancel", "done") == 2
    raw.send_query("select pg_sleep(30)")
    time.sleep(0.3)
    assert link_ask(a, as_c, link.cancel_request(p.CancelRequest(key.pid, key.secret))) == link.Reply()
    assert raw.error_text() == CANCELLED
    raw.close()


def test_malformed_link_requests_are_refused_with_a_reason(fleet, cluster_dir):
    a = fleet[0]
    as_b = link_client_context(cluster_dir / "ca.pem", cluster_dir / "gw-b.pem", cluster_dir / "gw-b-key.pem")
    with pytest.raises(LinkUnreachable, match="refused the cancel request: a cancel payload is"):
        link_ask(a, as_b, link.Request(link.Kind.CANCEL, b"\0\0"))
    for data, reason in ((b"\0\0\0\x0bRnot-a-link", "without the pgsni-link magic"),
                         (link.Reply().encode(), "opens with a request, not a reply"),
                         (link.cancel_request(p.CancelRequest(1, b"abcd")).encode() + b"\x16\x03",
                          "a cancel request carries no stream")):
        reply = send_raw(a, as_b, data)
        assert reply.status is link.Status.REFUSED and reason in reply.text
    assert (link_requests(a, "invalid", "refused"), link_requests(a, "cancel", "refused")) == (2, 2)


def link_requests(gt, kind: str, result: str) -> float:
    return gt.gw.metrics.link_requests.labels(kind, result)._value.get()


def send_raw(gt, context: ssl.SSLContext, data: bytes, bare: bool = False) -> link.Reply | None:
    """`data` sent inside a link's TLS (a bare link's, gateway/proxy/bare_link.py, if `bare`);
    the reply, or None if the link closed without one."""
    host, port = gt.settings.advertise_address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        if bare:
            sock.sendall(BARE)
        with context.wrap_socket(sock, server_hostname=None) as tls_sock:
            tls_sock.sendall(data)
            reader = link.LinkReader()
            while (reply := reader.next_message()) is None:
                chunk = tls_sock.recv(4096)
                if not chunk:
                    return None
                reader.receive_data(chunk)
    return reply


def test_the_public_port_does_not_speak_the_link_protocol(fleet, tls, cluster_dir):
    a = fleet[0]
    as_b = link_client_context(cluster_dir / "ca.pem", cluster_dir / "gw-b.pem", cluster_dir / "gw-b-key.pem")
    request = link.cancel_request(p.CancelRequest(1, b"abcd"))
    with pytest.raises(LinkUnreachable, match="CERTIFICATE_VERIFY_FAILED"):  # not a cluster member
        link_ask(a, as_b, request, address=f"127.0.0.1:{a.port}")
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as sock:  # and without TLS
        sock.sendall(request.encode())
        answer = sock.recv(4096)
    assert answer[:1] in (b"", b"E")  # a Postgres refusal or a close, never a link reply


def test_a_gateway_with_another_clusters_certificate_does_not_start(make_settings, cluster_dir, tmp_path):
    other = make_cluster(tmp_path / "other", ["gw-x"], days=1)
    address = f"127.0.0.1:{free_port()}"
    settings = make_settings(advertise_address=address, cluster_listen=address,
                             cluster_ca=str(cluster_dir / "ca.pem"), cluster_cert=str(other.members["gw-x"][0]),
                             cluster_key=str(other.members["gw-x"][1]))
    with pytest.raises(TLSConfigError, match="was not issued by cluster_ca .*other gateways would refuse it"):
        GatewayThread(settings).start()
