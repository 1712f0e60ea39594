"""The gateway-to-gateway link codec (gateway/wire/link.py), without sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.wire import link
from gateway.wire.link import Kind, LinkError, LinkReader, Reply, Request, Status
from gateway.wire import protocol as p
from gateway.wire.protocol import CancelRequest


def read(data: bytes, chunk: int = 0) -> tuple[Request | Reply | None, LinkReader]:
    reader = LinkReader()
    if chunk:
        msg = None
        for i in range(0, len(data), chunk):
            assert msg is None, "a message came out before all its bytes arrived"
            reader.receive_data(data[i:i + chunk])
            msg = reader.next_message()
        return msg, reader
    reader.receive_data(data)
    return reader.next_message(), reader


@pytest.mark.parametrize("secret", [b"\x01\x02\x03\x04", bytes(range(32)), b"x" * 256])
def test_a_cancel_request_round_trips_byte_by_byte(secret):
    request = CancelRequest(0xFFFFFFF0, secret)
    msg, _ = read(link.cancel_request(request).encode(), chunk=1)
    assert msg == Request(Kind.CANCEL, msg.payload)
    assert link.cancel_payload(msg.payload) == request


@pytest.mark.parametrize("reply", [Reply(), Reply(Status.REFUSED, "unknown link request kind 'x'")])
def test_replies_round_trip(reply):
    assert read(reply.encode())[0] == reply


def test_bytes_after_the_message_are_its_stream():
    msg, reader = read(Request(Kind.CANCEL, b"\0" * 8).encode() + b"\x16\x03\x01rest")
    assert msg.kind is Kind.CANCEL
    assert reader.rest() == b"\x16\x03\x01rest"
    with pytest.raises(LinkError, match="one message"):
        reader.next_message()


def test_an_unknown_kind_is_refused_by_name():
    data = Request(Kind.CANCEL).encode().replace(b"\x06cancel", b"\x08teleport")
    data = struct.pack("!I", len(data) - 4) + data[4:]
    with pytest.raises(LinkError, match="unknown link request kind b'teleport'"):
        read(data)


@pytest.mark.parametrize("data, match", [
    (struct.pack("!I", 0), "length 0"),
    (struct.pack("!I", link.MAX_FRAME + 1), "length"),
    (struct.pack("!I", 3) + b"GET", "unknown link message type"),
    (p.CancelRequest(1234, b"abcd").encode() + bytes(4), "not a pgsni gateway link"),  # Postgres bytes
    (struct.pack("!I", 11) + b"Rnot-a-link", "magic"),
    (struct.pack("!I", 13) + b"R" + link.MAGIC + b"\x09\x00", "version 9"),
    (struct.pack("!I", 12) + b"R" + link.MAGIC + b"\x01", "cut short"),
    (struct.pack("!I", 15) + b"R" + link.MAGIC + b"\x01\x06ca", "cut short inside"),
    (struct.pack("!I", 2) + b"A\x07", "status"),
])
def test_malformed_messages_are_named(data, match):
    with pytest.raises(LinkError, match=match):
        read(data)


def test_a_partial_message_is_not_an_error():
    data = link.cancel_request(CancelRequest(1, b"abcd")).encode()
    msg, reader = read(data[:-1])
    assert msg is None
    reader.receive_data(data[-1:])
    assert reader.next_message().kind is Kind.CANCEL


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\1abc", b"\0\0\0\1" + b"x" * 257])
def test_cancel_payloads_are_bounded(payload):
    with pytest.raises(LinkError, match="cancel payload"):
        link.cancel_payload(payload)


def test_an_oversized_message_is_not_encoded():
    with pytest.raises(LinkError, match="over the"):
        Request(Kind.CANCEL, b"x" * link.MAX_FRAME).encode()


_valid = st.builds(lambda pid, secret: link.cancel_request(CancelRequest(pid, secret)).encode(),
                   st.integers(0, 2**32 - 1), st.binary(min_size=4, max_size=256))


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), _valid,
                      _valid.flatmap(lambda v: st.integers(0, len(v) - 1).map(lambda i: v[:i] + bytes([v[i] ^ 0x5A]) + v[i + 1:]))),
       cut=st.integers(0, 300))
def test_any_bytes_give_a_message_nothing_yet_or_a_link_error(data, cut):
    """Fuzzed: whatever a peer sends, in whatever pieces, the reader answers with a message,
    None (more is needed) or LinkError; a cancel request it accepts has a bounded payload."""
    reader = LinkReader()
    try:
        for piece in (data[:cut], data[cut:]):
            reader.receive_data(piece)
            msg = reader.next_message()
            if msg is not None:
                if isinstance(msg, Request):
                    link.cancel_payload(msg.payload)
                break
    except LinkError:
        pass


def test_a_forward_request_carries_the_client_address_its_opening_and_its_hello():
    for direct in (True, False):
        for hello in (b"", bytes(range(32))):
            sent = link.Forwarded("203.0.113.7:50123", direct, hello)
            request, _ = read(link.forward_request(sent).encode())
            assert request.kind is Kind.FORWARD and link.forward_payload(request.payload) == sent
    with pytest.raises(LinkError, match="32 bytes, not 5"):
        link.forward_request(link.Forwarded("203.0.113.7:50123", True, b"short"))


@pytest.mark.parametrize("payload, match", [
    (b"", "not 0 bytes"),
    (b"\x01", "not 1 bytes"),
    (b"\x01\x00", "not 2 bytes"),
    (b"\x02\x00" + b"1.2.3.4:5", "0/1 byte"),
    (b"\x01\x00" + b"x" * 201, "not 203 bytes"),
    (b"\x01\x07" + b"x" * 20, "digest is 0 or 32 bytes, not 7"),
    (b"\x01\x20" + b"x" * 32, "not 34 bytes"),
    (b"\x00\x00" + "ü:1".encode(), "not ASCII"),
    (b"\x00\x00" + b"1.2.3.4:5\n", "control characters"),
])
def test_malformed_forward_payloads_are_refused(payload, match):
    with pytest.raises(LinkError, match=match):
        link.forward_payload(payload)


def test_a_session_request_carries_the_client_and_its_tls():
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 1800 + "\n-----END CERTIFICATE-----\n"
    sent = link.HandedSession("[2001:db8::7]:50123", "TLSv1.3", "TLS_AES_256_GCM_SHA384", pem)
    request, rest = read(link.session_request(sent).encode() + b"\x00\x00\x00\x08startup")
    assert request.kind is Kind.SESSION and link.session_payload(request.payload) == sent
    assert rest.rest() == b"\x00\x00\x00\x08startup"  # the startup message follows as the stream


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=60), st.builds(
    lambda fields, cut: link.session_request(link.HandedSession(*fields)).payload[:cut],
    st.tuples(*[st.text(min_size=1, max_size=20)] * 4), st.integers(0, 100))))
def test_a_session_payload_decodes_or_is_refused(payload):
    """Fuzzed: any payload gives a session whose client address is printable, or LinkError."""
    try:
        handed = link.session_payload(payload)
    except LinkError:
        return
    assert 1 <= len(handed.peer) <= link.MAX_PEER and handed.peer.isprintable()


@pytest.mark.parametrize("payload, match", [
    (b"", "ends inside a field"),
    (b"\x00\x05abc", "ends inside a field"),
    (b"\x00\x00" * 4, "malformed"),  # no client address
    (b"\x00\x011" + b"\x00\x00" * 3 + b"x", "1 bytes after"),
    (b"\x00\x02\xc3\x28" + b"\x00\x00" * 3, "not UTF-8"),
])
def test_malformed_session_payloads_are_refused(payload, match):
    with pytest.raises(LinkError, match=match):
        link.session_payload(payload)
