"""Unit tests for the sans-IO wire codec in gateway/wire/protocol.py (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.wire import protocol as p
from gateway.wire.protocol import (
    NEED_DATA, BackendKeyData, CancelRequest, ErrorResponse, GSSENCRequest, Message, MessageReader,
    NegotiateProtocolVersion, ParameterStatus, ProtocolViolation, SSLRequest, StartupMessage)


def events_of(reader: MessageReader, data: bytes = b"") -> list:
    """Feed `data`, then pull events until NEED_DATA."""
    if data:
        reader.receive_data(data)
    out = []
    while True:
        ev = reader.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


def untyped(code: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A raw untyped packet: length, code, body (length defaults to the true size)."""
    if length is None:
        length = 8 + len(body)
    return struct.pack("!ii", length, code) + body


def one_event(data: bytes, *, startup: bool = True, max_length: int = 1 << 20):
    reader = MessageReader(startup=startup, max_length=max_length)
    evs = events_of(reader, data)
    assert len(evs) == 1, evs
    assert reader.buffered == 0
    return evs[0]


# --- untyped openings ----------------------------------------------------------------------


def test_ssl_request_encoding_is_the_documented_8_bytes():
    assert SSLRequest().encode() == bytes.fromhex("0000000804d2162f")


def test_gssenc_request_encoding_is_the_documented_8_bytes():
    assert GSSENCRequest().encode() == bytes.fromhex("0000000804d21630")


def test_ssl_request_decodes():
    reader = MessageReader(startup=True)
    assert events_of(reader, SSLRequest().encode()) == [SSLRequest()]
    # after the opening packet, the reader expects typed messages
    assert reader.expect_startup is False


def test_gssenc_request_decodes():
    assert one_event(GSSENCRequest().encode()) == GSSENCRequest()


def test_cancel_request_3_0_decodes():
    msg = CancelRequest(pid=4242, secret=b"\x01\x02\x03\x04")
    raw = msg.encode()
    assert len(raw) == 16
    assert raw[:8] == struct.pack("!ii", 16, p.CANCEL_REQUEST_CODE)
    assert one_event(raw) == msg


def test_cancel_request_with_long_3_2_secret_decodes():
    secret = bytes(range(256))  # the longest key protocol 3.2 allows
    msg = CancelRequest(pid=0xFFFFFFF0, secret=secret)
    raw = msg.encode()
    assert len(raw) == p.MAX_CANCEL_LENGTH
    ev = one_event(raw)
    assert ev == msg
    assert ev.secret == secret and ev.pid == 0xFFFFFFF0


def test_cancel_request_with_32_byte_secret_decodes():
    msg = CancelRequest(pid=7, secret=b"s" * 32)
    assert one_event(msg.encode()) == msg


def test_startup_message_with_params_decodes():
    msg = StartupMessage(3, 0, {"user": "alice", "database": "app", "options": "-c a=b endpoint=x",
                                "application_name": "pgsni tests ✓"})
    ev = one_event(msg.encode())
    assert ev == msg
    assert ev.major == 3 and ev.minor == 0
    assert list(ev.params) == ["user", "database", "options", "application_name"]


def test_startup_message_protocol_3_2_version_split():
    ev = one_event(StartupMessage(3, 2, {"user": "u"}).encode())
    assert (ev.major, ev.minor) == (3, 2)


def test_startup_message_with_no_params_decodes():
    raw = StartupMessage(3, 0, {}).encode()
    assert raw == struct.pack("!ii", 9, p.PROTOCOL_3_0) + b"\0"
    assert one_event(raw) == StartupMessage(3, 0, {})


def test_startup_message_with_empty_value_decodes():
    msg = StartupMessage(3, 0, {"user": "bob", "options": "", "database": ""})
    ev = one_event(msg.encode())
    assert ev.params == {"user": "bob", "options": "", "database": ""}


def test_startup_encode_refuses_nul_in_strings():
    with pytest.raises(ValueError):
        StartupMessage(3, 0, {"us\0er": "x"}).encode()
    with pytest.raises(ValueError):
        StartupMessage(3, 0, {"user": "x\0y"}).encode()


@pytest.mark.parametrize("msg", [
    SSLRequest(),
    GSSENCRequest(),
    CancelRequest(pid=1, secret=b"abcd"),
    CancelRequest(pid=2, secret=b"k" * 200),
    StartupMessage(3, 0, {"user": "alice", "database": "db1"}),
], ids=repr)
def test_byte_at_a_time_needs_data_until_complete(msg):
    raw = msg.encode()
    reader = MessageReader(startup=True)
    for i, byte in enumerate(raw[:-1]):
        reader.receive_data(bytes([byte]))
        assert reader.next_event() is NEED_DATA, f"event after {i + 1} of {len(raw)} bytes"
        assert reader.buffered == i + 1
    reader.receive_data(raw[-1:])
    assert reader.next_event() == msg
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == 0


def test_typed_message_byte_at_a_time():
    raw = Message(b"p", b"hello world").encode()
    reader = MessageReader(startup=False)
    for byte in raw[:-1]:
        reader.receive_data(bytes([byte]))
        assert reader.next_event() is NEED_DATA
    reader.receive_data(raw[-1:])
    assert reader.next_event() == Message(b"p", b"hello world")
    assert reader.next_event() is NEED_DATA


def test_two_messages_in_one_chunk_startup_then_typed():
    startup = StartupMessage(3, 0, {"user": "u"})
    typed = Message(b"p", b"\x00\x01")
    reader = MessageReader(startup=True)
    evs = events_of(reader, startup.encode() + typed.encode())
    assert evs == [startup, typed]
    assert reader.buffered == 0


def test_two_typed_messages_in_one_chunk():
    a, b = Message(b"Q", b"select 1\0"), Message(b"X", b"")
    reader = MessageReader(startup=False)
    assert events_of(reader, a.encode() + b.encode()) == [a, b]


def test_typed_message_framing():
    msg = Message(b"Q", b"select 1\0")
    raw = msg.encode()
    assert raw == b"Q" + struct.pack("!i", 4 + 9) + b"select 1\0"
    assert one_event(raw, startup=False) == msg


def test_typed_message_with_empty_body():
    assert one_event(b"X\x00\x00\x00\x04", startup=False) == Message(b"X", b"")


def test_take_buffer_returns_unconsumed_bytes():
    startup = StartupMessage(3, 0, {"user": "u"}).encode()
    pipelined = Message(b"Q", b"select 1\0").encode() + b"\x01\x02partial"
    reader = MessageReader(startup=True)
    reader.receive_data(startup + pipelined)
    assert reader.next_event() == StartupMessage(3, 0, {"user": "u"})
    assert reader.buffered == len(pipelined)
    assert reader.take_buffer() == pipelined
    assert reader.buffered == 0
    assert reader.take_buffer() == b""
    assert reader.next_event() is NEED_DATA


def test_take_buffer_returns_a_partial_message():
    raw = Message(b"p", b"abcdef").encode()
    reader = MessageReader(startup=False)
    reader.receive_data(raw[:7])
    assert reader.next_event() is NEED_DATA
    assert reader.take_buffer() == raw[:7]


# --- malformed openings --------------------------------------------------------------------


def _violation(data: bytes, *, startup: bool = True, max_length: int = 1 << 20, match: str | None = None):
    reader = MessageReader(startup=startup, max_length=max_length)
    reader.receive_data(data)
    with pytest.raises(ProtocolViolation, match=match):
        while reader.next_event() is not NEED_DATA:
            pass


@pytest.mark.parametrize("length", [-1, 0, 4, 7])
def test_startup_length_below_8_is_refused(length):
    _violation(untyped(p.PROTOCOL_3_0, b"user\0u\0\0", length=length), match="length")


@pytest.mark.parametrize("length", [p.MAX_STARTUP_LENGTH + 1, 1 << 30, 0x7FFFFFFF])
def test_startup_length_above_10000_is_refused_without_waiting_for_body(length):
    # only the 8-byte header is there: the reader must refuse now, not wait for 10 kB+
    _violation(struct.pack("!ii", length, p.PROTOCOL_3_0), match="length")


def test_startup_length_at_limit_is_accepted():
    value = "v" * (p.MAX_STARTUP_LENGTH - 8 - len("user\0") - 2)
    raw = StartupMessage(3, 0, {"user": value}).encode()
    assert len(raw) == p.MAX_STARTUP_LENGTH
    assert one_event(raw).params["user"] == value


def test_startup_unterminated_params_refused():
    _violation(untyped(p.PROTOCOL_3_0, b"user\0alice\0"), match="terminated")


def test_startup_with_empty_body_refused():
    _violation(untyped(p.PROTOCOL_3_0, b""), match="terminated")


def test_startup_odd_params_refused():
    _violation(untyped(p.PROTOCOL_3_0, b"user\0alice\0database\0\0"), match="without a value")


def test_startup_empty_param_name_refused():
    _violation(untyped(p.PROTOCOL_3_0, b"user\0alice\0\0value\0\0"), match="empty parameter name")


def test_startup_invalid_utf8_name_refused():
    _violation(untyped(p.PROTOCOL_3_0, b"us\xffer\0alice\0\0"), match="UTF-8")


def test_startup_invalid_utf8_value_refused():
    _violation(untyped(p.PROTOCOL_3_0, b"user\0\xc3\x28\0\0"), match="UTF-8")


def test_ssl_request_with_body_refused():
    _violation(untyped(p.SSL_REQUEST_CODE, b"\0\0\0\0"), match="SSLRequest")


def test_gssenc_request_with_body_refused():
    _violation(untyped(p.GSSENC_REQUEST_CODE, b"x"), match="GSSENCRequest")


@pytest.mark.parametrize("body", [b"", b"\0\0\0\1", b"\0\0\0\1abc"])
def test_cancel_request_too_short_refused(body):
    _violation(untyped(p.CANCEL_REQUEST_CODE, body), match="CancelRequest")


def test_cancel_request_too_long_refused():
    body = struct.pack("!I", 1) + b"k" * 257  # one byte over the 256-byte 3.2 key
    assert 8 + len(body) == p.MAX_CANCEL_LENGTH + 1
    _violation(untyped(p.CANCEL_REQUEST_CODE, body), match="CancelRequest")


def test_tls_byte_where_startup_expected_refused_at_first_byte():
    reader = MessageReader(startup=True)
    reader.receive_data(b"\x16")
    with pytest.raises(ProtocolViolation, match="TLS"):
        reader.next_event()


def test_tls_client_hello_where_startup_expected_refused():
    _violation(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", match="TLS")


# --- malformed typed messages --------------------------------------------------------------


@pytest.mark.parametrize("length", [-5, 0, 3])
def test_typed_length_below_4_refused(length):
    _violation(struct.pack("!ci", b"p", length), startup=False, match="invalid length")


def test_typed_length_over_max_refused_from_header_alone():
    reader = MessageReader(startup=False, max_length=1024)
    # only the 5-byte header, claiming a body far bigger than the limit
    reader.receive_data(struct.pack("!ci", b"p", 1025))
    with pytest.raises(ProtocolViolation, match="exceeds"):
        reader.next_event()


def test_typed_length_over_max_needs_exactly_the_header():
    reader = MessageReader(startup=False, max_length=1024)
    header = struct.pack("!ci", b"Q", 50_000_000)
    reader.receive_data(header[:4])
    assert reader.next_event() is NEED_DATA
    reader.receive_data(header[4:])
    with pytest.raises(ProtocolViolation):
        reader.next_event()


def test_typed_length_at_max_is_accepted():
    reader = MessageReader(startup=False, max_length=1024)
    body = b"x" * (1024 - 4)
    assert events_of(reader, Message(b"p", body).encode()) == [Message(b"p", body)]


# --- SASL frontend messages ----------------------------------------------------------------


def test_decode_sasl_initial_with_data():
    raw = p.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc").encode()
    msg = one_event(raw, startup=False)
    assert msg.type == b"p"
    assert p.decode_sasl_initial(msg) == p.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_decode_sasl_initial_with_empty_data_is_not_none():
    msg = Message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 0))
    assert p.decode_sasl_initial(msg) == p.SASLInitialResponse("SCRAM-SHA-256", b"")


def test_decode_sasl_initial_with_minus_one_length():
    raw = p.SASLInitialResponse("SCRAM-SHA-256", None).encode()
    assert raw.endswith(b"\xff\xff\xff\xff")
    msg = one_event(raw, startup=False)
    assert p.decode_sasl_initial(msg) == p.SASLInitialResponse("SCRAM-SHA-256", None)


@pytest.mark.parametrize("body", [
    b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"abc",      # says 5, has 3
    b"SCRAM-SHA-256\0" + struct.pack("!i", 1) + b"abc",      # says 1, has 3
    b"SCRAM-SHA-256\0" + struct.pack("!i", -1) + b"abc",     # -1 but carries data
    b"SCRAM-SHA-256\0" + struct.pack("!i", -2),              # negative length
])
def test_decode_sasl_initial_length_mismatch(body):
    with pytest.raises(ProtocolViolation, match="length"):
        p.decode_sasl_initial(Message(b"p", body))


@pytest.mark.parametrize("body", [
    b"SCRAM-SHA-256",                    # name not terminated
    b"SCRAM-SHA-256\0",                  # no length
    b"SCRAM-SHA-256\0\0\0",              # length cut short
])
def test_decode_sasl_initial_truncated(body):
    with pytest.raises(ProtocolViolation):
        p.decode_sasl_initial(Message(b"p", body))


def test_decode_sasl_initial_wrong_type():
    body = b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"abc"
    with pytest.raises(ProtocolViolation, match="SASLInitialResponse"):
        p.decode_sasl_initial(Message(b"Q", body))


def test_decode_sasl_initial_invalid_utf8_mechanism():
    with pytest.raises(ProtocolViolation, match="UTF-8"):
        p.decode_sasl_initial(Message(b"p", b"SCRAM\xff\0" + struct.pack("!i", -1)))


def test_decode_sasl_response():
    assert p.decode_sasl_response(Message(b"p", b"c=biws,r=x,p=y")) == b"c=biws,r=x,p=y"
    with pytest.raises(ProtocolViolation):
        p.decode_sasl_response(Message(b"Q", b"c=biws"))


# --- backend messages ----------------------------------------------------------------------


def _roundtrip_backend(raw: bytes):
    return p.decode_backend(one_event(raw, startup=False))


def test_decode_backend_authentication():
    assert _roundtrip_backend(p.Authentication(p.AUTH_OK).encode()) == p.Authentication(0, b"")
    ev = _roundtrip_backend(p.Authentication(p.AUTH_SASL_CONTINUE, b"r=abc,s=xyz,i=4096").encode())
    assert ev == p.Authentication(11, b"r=abc,s=xyz,i=4096")


def test_auth_sasl_lists_mechanisms():
    ev = _roundtrip_backend(p.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]).encode())
    assert ev.code == p.AUTH_SASL
    assert ev.data == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"


def test_decode_backend_parameter_status_roundtrip():
    ps = ParameterStatus("server_version", "17.2 (Debian)")
    raw = ps.encode()
    assert raw == b"S" + struct.pack("!i", 4 + len(b"server_version\x0017.2 (Debian)\0")) + \
        b"server_version\x0017.2 (Debian)\0"
    assert _roundtrip_backend(raw) == ps


def test_decode_backend_parameter_status_empty_value():
    assert _roundtrip_backend(ParameterStatus("application_name", "").encode()) == \
        ParameterStatus("application_name", "")


@pytest.mark.parametrize("key", [
    BackendKeyData(pid=1234, secret=b"\x00\x01\x02\x03"),
    BackendKeyData(pid=0xFFFFFFFF, secret=b"z" * 256),
])
def test_backend_key_data_roundtrip(key):
    raw = key.encode()
    assert raw[:1] == b"K" and struct.unpack("!i", raw[1:5])[0] == 4 + 4 + len(key.secret)
    assert _roundtrip_backend(raw) == key


def test_decode_backend_ready_for_query():
    assert _roundtrip_backend(p.ReadyForQuery().encode()) == p.ReadyForQuery(b"I")
    assert _roundtrip_backend(p.ReadyForQuery(b"T").encode()) == p.ReadyForQuery(b"T")


@pytest.mark.parametrize("body", [b"", b"II"])
def test_decode_backend_ready_for_query_wrong_size(body):
    with pytest.raises(ProtocolViolation, match="ReadyForQuery"):
        p.decode_backend(Message(b"Z", body))


def test_error_response_roundtrip_with_detail_and_hint():
    err = ErrorResponse("3D000", 'database "x" does not exist', detail="some detail",
                        hint="some hint ✓")
    raw = err.encode()
    assert raw[:1] == b"E"
    msg = one_event(raw, startup=False)
    fields = p.decode_fields(msg.body)
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "3D000", "M": 'database "x" does not exist',
                      "D": "some detail", "H": "some hint ✓"}
    assert p.decode_backend(msg) == err
    assert p.decode_error(msg) == err


def test_error_response_without_detail_and_hint_omits_fields():
    err = ErrorResponse("28P01", "password authentication failed", severity="ERROR")
    msg = one_event(err.encode(), startup=False)
    assert set(p.decode_fields(msg.body)) == {"S", "V", "C", "M"}
    assert p.decode_backend(msg) == err


def test_notice_response_roundtrip():
    notice = ErrorResponse("00000", "hello", severity="NOTICE", notice=True)
    raw = notice.encode()
    assert raw[:1] == b"N"
    decoded = _roundtrip_backend(raw)
    assert decoded == notice and decoded.notice is True


def test_decode_error_prefers_nonlocalized_severity():
    body = b"SFEHLER\0VERROR\0C42601\0Msyntax\0\0"
    err = p.decode_error(Message(b"E", body))
    assert err.severity == "ERROR" and err.code == "42601" and err.message == "syntax"


def test_decode_error_defaults_when_fields_missing():
    err = p.decode_error(Message(b"E", b"\0"))
    assert err.code == "XX000" and err.message == "" and err.severity == "ERROR"


def test_decode_error_unterminated_field_refused():
    with pytest.raises(ProtocolViolation):
        p.decode_backend(Message(b"E", b"C28P01"))


@pytest.mark.parametrize("npv", [
    NegotiateProtocolVersion(0),
    NegotiateProtocolVersion(2, ("_pq_.compression", "_pq_.other")),
])
def test_negotiate_protocol_version_roundtrip(npv):
    raw = npv.encode()
    assert raw[:1] == b"v"
    assert _roundtrip_backend(raw) == npv


def test_negotiate_protocol_version_truncated_name_list():
    body = struct.pack("!ii", 0, 2) + b"_pq_.a\0"  # says two names, has one
    with pytest.raises(ProtocolViolation):
        p.decode_backend(Message(b"v", body))


@pytest.mark.parametrize("mtype,body", [
    (b"R", b""),
    (b"R", b"\0\0\0"),
    (b"K", b"\0\0"),
    (b"v", b"\0\0\0\0"),
    (b"S", b"server_version"),
    (b"S", b"server_version\x0017"),
])
def test_decode_backend_truncated_bodies(mtype, body):
    with pytest.raises(ProtocolViolation):
        p.decode_backend(Message(mtype, body))


def test_decode_backend_passes_other_messages_through():
    msg = Message(b"D", b"\0\1")
    assert p.decode_backend(msg) is msg


# --- property tests ------------------------------------------------------------------------


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def _run(reader: MessageReader, chunks: list[bytes]) -> tuple[list, bool]:
    """Feed chunks, draining events after each; return (events, ended in a violation)."""
    events = []
    for chunk in chunks:
        reader.receive_data(chunk)
        try:
            while (ev := reader.next_event()) is not NEED_DATA:
                events.append(ev)
        except ProtocolViolation:
            return events, True
    return events, False


def _check_events(events: list, max_length: int) -> None:
    for ev in events:
        assert isinstance(ev, (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, Message))
        if isinstance(ev, Message):
            assert len(ev.type) == 1
            assert len(ev.body) <= max_length


_FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# random bytes, plus the same with a valid opening in front so the typed path is reached too
_random_stream = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda head, tail: head + tail,
              st.sampled_from([SSLRequest().encode(), StartupMessage(3, 0, {"user": "u"}).encode(),
                               CancelRequest(1, b"abcd").encode(), b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"]),
              st.binary(max_size=600)),
)


@_FUZZ
@given(data=_random_stream, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_fuzz_startup_reader_only_raises_protocol_violation(data, cuts):
    whole, whole_failed = _run(MessageReader(startup=True, max_length=1024), [data])
    chunked, chunked_failed = _run(MessageReader(startup=True, max_length=1024), _chunked(data, cuts))
    _check_events(chunked, 1024)
    # chunking must not change what the stream means
    assert (chunked, chunked_failed) == (whole, whole_failed)


def _typed_stream():
    # sequences of plausible typed messages (some oversized) mixed with garbage
    message = st.builds(lambda t, body: Message(t, body).encode(),
                        st.binary(min_size=1, max_size=1), st.binary(max_size=1100))
    piece = st.one_of(message, st.binary(max_size=40))
    return st.lists(piece, max_size=6).map(b"".join)


@_FUZZ
@given(data=st.one_of(st.binary(max_size=600), _typed_stream()),
       cuts=st.lists(st.integers(min_value=0, max_value=8000), max_size=20))
def test_fuzz_typed_reader_only_raises_protocol_violation(data, cuts):
    whole, whole_failed = _run(MessageReader(startup=False, max_length=1024), [data])
    reader = MessageReader(startup=False, max_length=1024)
    chunked, chunked_failed = _run(reader, _chunked(data, cuts))
    _check_events(chunked, 1024)
    assert (chunked, chunked_failed) == (whole, whole_failed)
    if not chunked_failed:
        # everything not framed is still buffered, and the framed messages account for the rest
        framed = sum(5 + len(m.body) for m in chunked)
        assert framed + reader.buffered == len(data)


_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=250, deadline=None)
@given(params=st.dictionaries(_text.filter(bool), _text, max_size=8),
       minor=st.integers(min_value=0, max_value=0xFFFF))
def test_startup_message_roundtrip(params, minor):
    msg = StartupMessage(3, minor, params)
    raw = msg.encode()
    if len(raw) > p.MAX_STARTUP_LENGTH:  # pragma: no cover - cannot happen at these sizes
        return
    reader = MessageReader(startup=True)
    reader.receive_data(raw)
    ev = reader.next_event()
    assert ev == msg
    assert list(ev.params.items()) == list(params.items())
    assert reader.next_event() is NEED_DATA and reader.buffered == 0
