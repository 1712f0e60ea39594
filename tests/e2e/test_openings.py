"""Every way a client can open a connection, byte by byte: SSLRequest, direct TLS with and
without ALPN, GSSENCRequest, newer protocol versions, pipelining, and malformed input."""

from __future__ import annotations

import socket
import time

from gateway.wire import protocol as p

from ..support.harness import DOMAIN, TEST_PASSWORD
from ..support.rawclient import RawClient, pack_untyped

PARAMS = {"user": "postgres", "database": "postgres"}


def _tls_client(gateway, tls, db_id: str = "app1") -> RawClient:
    """A raw client over TLS (SSLRequest first) with SNI `<db_id>.<domain>`."""
    raw = RawClient(gateway.port)
    raw.start_tls(str(tls["ca"]), f"{db_id}.{DOMAIN}")
    return raw


def _login(raw: RawClient, *, then: bytes = b"") -> list:
    raw.scram("postgres", TEST_PASSWORD, then=then)
    events = []
    while True:
        ev = raw.next_backend()
        events.append(ev)
        if isinstance(ev, p.ReadyForQuery) or isinstance(ev, p.ErrorResponse):
            return events


def _query_result(raw: RawClient) -> list[str]:
    """First column of each DataRow until ReadyForQuery."""
    rows = []
    while True:
        msg = raw.next_message()
        if msg.type == b"D":
            length = int.from_bytes(msg.body[2:6], "big", signed=True)
            rows.append(msg.body[6:6 + length].decode())
        if msg.type == b"Z":
            return rows


def test_direct_tls_without_alpn_and_with_it(gateway, tls):
    gateway.create_db("app1")
    for alpn in (None, ["postgresql"]):
        raw = RawClient(gateway.port)
        raw.start_tls(str(tls["ca"]), f"app1.{DOMAIN}", request=False, alpn=alpn)
        if alpn:
            assert raw.sock.selected_alpn_protocol() == "postgresql"
        raw.startup(PARAMS)
        events = _login(raw)
        assert isinstance(events[-1], p.ReadyForQuery)
        assert any(isinstance(e, p.BackendKeyData) for e in events)
        raw.close()


def test_gssenc_request_is_declined_then_tls_proceeds(gateway, tls):
    gateway.create_db("app1")
    raw = RawClient(gateway.port)
    raw.send(p.GSSENCRequest().encode())
    assert raw.recv_byte() == b"N"
    raw.start_tls(str(tls["ca"]), f"app1.{DOMAIN}")
    raw.startup(PARAMS)
    assert isinstance(_login(raw)[-1], p.ReadyForQuery)
    raw.close()


def test_newer_minor_version_and_pq_options_get_negotiate_protocol_version(gateway, tls):
    gateway.create_db("app1")
    raw = _tls_client(gateway, tls)
    # as Postgres 18: 3.2 is spoken, so the answer names 3.2 and the unknown option
    raw.startup({**PARAMS, "_pq_.frobnicate": "on"}, minor=2)
    first = raw.next_backend()
    assert first == p.NegotiateProtocolVersion(2, ("_pq_.frobnicate",))
    assert isinstance(_login(raw)[-1], p.ReadyForQuery)
    raw.close()


def test_a_minor_newer_than_3_2_is_negotiated_down_to_3_2(gateway, tls):
    gateway.create_db("app1")
    raw = _tls_client(gateway, tls)
    raw.startup(PARAMS, minor=9)
    assert raw.next_backend() == p.NegotiateProtocolVersion(2, ())
    assert isinstance(_login(raw)[-1], p.ReadyForQuery)
    raw.close()


def test_protocol_2_is_refused(gateway, tls):
    raw = _tls_client(gateway, tls)
    raw.send(p.StartupMessage(2, 0, PARAMS).encode())
    err = raw.next_backend()
    assert isinstance(err, p.ErrorResponse) and err.code == "0A000"
    raw.close()


def test_pipelined_query_after_scram_is_not_dropped(gateway, tls):
    gateway.create_db("app1")
    raw = _tls_client(gateway, tls)
    raw.startup(PARAMS)
    # the query goes out with the last SCRAM message, long before ReadyForQuery comes back
    events = _login(raw, then=raw.query("select 'pipelined'"))
    assert isinstance(events[-1], p.ReadyForQuery)
    assert _query_result(raw) == ["pipelined"]
    raw.close()


def test_malformed_startup_gets_08P01_and_gateway_keeps_serving(gateway, tls):
    gateway.create_db("app1")
    raw = _tls_client(gateway, tls)
    raw.send(pack_untyped(3 << 16, b"user\0postgres\0dangling\0"))  # odd number of strings
    err = raw.next_backend()
    assert isinstance(err, p.ErrorResponse) and err.code == "08P01"
    assert raw.closed()
    raw.close()
    # a huge length is refused without waiting for the bytes
    raw = RawClient(gateway.port)
    raw.send(b"\x7f\xff\xff\xff\x00\x03\x00\x00")
    err = raw.next_backend()
    assert isinstance(err, p.ErrorResponse) and err.code == "08P01"
    raw.close()
    # and the next client is served normally
    raw = _tls_client(gateway, tls)
    raw.startup(PARAMS)
    assert isinstance(_login(raw)[-1], p.ReadyForQuery)
    raw.close()


def test_oversized_sasl_message_is_refused(gateway, tls):
    gateway.create_db("app1")
    raw = _tls_client(gateway, tls)
    raw.startup(PARAMS)
    assert raw.next_backend().code == p.AUTH_SASL
    raw.send(b"p" + (10_000_000).to_bytes(4, "big"))
    err = raw.next_backend()
    assert isinstance(err, p.ErrorResponse) and err.code == "08P01" and "exceeds the limit" in err.message
    raw.close()


def test_silent_client_is_dropped_after_handshake_timeout(start_gateway):
    gw = start_gateway(handshake_timeout=0.5)
    for opening in (b"", p.SSLRequest().encode()):
        raw = RawClient(gw.port, timeout=5)
        raw.send(opening)
        started = time.monotonic()
        if opening:
            assert raw.recv_byte() == b"S"
        assert raw.closed()
        assert time.monotonic() - started < 4
        raw.close()


def test_client_vanishing_mid_scram_costs_nothing(gateway, tls):
    gateway.create_db("app1")
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    starts = gateway.gw.instances.starts
    raw = _tls_client(gateway, tls)
    raw.startup(PARAMS)
    assert raw.next_backend().code == p.AUTH_SASL
    raw.sock.close()
    time.sleep(0.3)
    assert gateway.gw.instances.starts == starts
    deadline = time.monotonic() + 5
    while gateway.gw.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gateway.gw.sessions


def test_tls_garbage_is_dropped(gateway):
    raw = RawClient(gateway.port, timeout=5)
    raw.send(b"\x16\x03\x01\x00\x05hello-not-tls" * 4)
    assert raw.closed()
    raw.close()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    s.close()  # and the listener is still there
