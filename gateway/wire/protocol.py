"""Sans-IO codec for the Postgres wire protocol (v3): bytes in, typed messages out, and back.

Nothing here touches a socket. `MessageReader` frames a byte stream into events and enforces
length limits; the dataclasses below encode themselves with `encode()`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

PROTOCOL_3_0 = 3 << 16
LATEST_MINOR = 2  # protocol 3.2 (Postgres 18): cancel keys up to 256 bytes
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
TLS_HANDSHAKE_BYTE = 0x16

# Postgres refuses startup packets above this size (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LENGTH = 10_000
# A cancel key is at most 256 bytes in protocol 3.2, so a CancelRequest is at most 12 + 256.
MAX_CANCEL_LENGTH = 12 + 256

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!ci")


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid message at this point."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# --- messages without a type byte (only ever the first message of a connection) ---------


@dataclass(frozen=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: bytes

    def encode(self) -> bytes:
        body = _I32.pack(CANCEL_REQUEST_CODE) + _U32.pack(self.pid & 0xFFFFFFFF) + self.secret
        return _I32.pack(len(body) + 4) + body


@dataclass(frozen=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = bytearray(_I32.pack((self.major << 16) | self.minor))
        for key, value in self.params.items():
            body += _cstr(key) + _cstr(value)
        body += b"\0"
        return _I32.pack(len(body) + 4) + bytes(body)


# --- typed messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Any typed message, still undecoded: `type` is one byte, `body` excludes the header."""

    type: bytes
    body: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.type, len(self.body) + 4) + self.body


Event = Union[SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, Message]


class MessageReader:
    """Frames a byte stream into events, h11 style: `receive_data`, then `next_event` until NEED_DATA.

    `startup=True` means the next message has no type byte (the first message of a
    connection, or the one after a refused GSSENCRequest). `max_length` bounds every typed
    message; startup packets are bounded by Postgres' own limit.
    """

    def __init__(self, *, startup: bool, max_length: int = 1 << 20) -> None:
        self._buf = bytearray()
        self.expect_startup = startup
        self.max_length = max_length

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Hand over whatever was received but not yet framed (e.g. pipelined bytes)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_event(self) -> Event | _NeedData:
        if self.expect_startup:
            return self._next_untyped()
        return self._next_typed()

    def _next_untyped(self) -> Event | _NeedData:
        buf = self._buf
        if buf and buf[0] == TLS_HANDSHAKE_BYTE:
            raise ProtocolViolation("TLS handshake received where a startup packet was expected")
        if len(buf) < 8:
            return NEED_DATA
        length, code = struct.unpack_from("!ii", buf)
        if length < 8 or length > MAX_STARTUP_LENGTH:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        if len(buf) < length:
            return NEED_DATA
        body = bytes(buf[8:length])
        del buf[:length]
        self.expect_startup = False
        return _decode_untyped(code, length, body)

    def _next_typed(self) -> Event | _NeedData:
        buf = self._buf
        if len(buf) < 5:
            return NEED_DATA
        mtype, length = _HEADER.unpack_from(buf)
        if length < 4:
            raise ProtocolViolation(f"invalid length {length} for message type {mtype!r}")
        if length > self.max_length:
            raise ProtocolViolation(
                f"message type {mtype!r} of {length} bytes exceeds the limit of {self.max_length}"
            )
        if len(buf) < length + 1:
            return NEED_DATA
        body = bytes(buf[5 : length + 1])
        del buf[: length + 1]
        return Message(mtype, body)


def _decode_untyped(code: int, length: int, body: bytes) -> Event:
    if code == SSL_REQUEST_CODE:
        _expect_empty(body, "SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        _expect_empty(body, "GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if length < 16 or length > MAX_CANCEL_LENGTH:
            raise ProtocolViolation(f"invalid CancelRequest length {length}")
        return CancelRequest(pid=_U32.unpack_from(body)[0], secret=body[4:])
    major, minor = code >> 16, code & 0xFFFF
    return StartupMessage(major, minor, _decode_params(body))


def _expect_empty(body: bytes, name: str) -> None:
    if body:
        raise ProtocolViolation(f"{name} must be exactly 8 bytes")


def _decode_params(body: bytes) -> dict[str, str]:
    # name\0value\0 ... \0: every string is terminated, and one more NUL ends the list
    if body == b"\0":
        return {}
    if not body.endswith(b"\0\0"):
        raise ProtocolViolation("startup packet is not terminated")
    parts = body[:-2].split(b"\0")
    if len(parts) % 2:
        raise ProtocolViolation("startup packet has a parameter name without a value")
    params: dict[str, str] = {}
    for key, value in zip(parts[::2], parts[1::2]):
        if not key:
            raise ProtocolViolation("startup packet has an empty parameter name")
        params[_text(key)] = _text(value)
    return params


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("startup packet is not valid UTF-8") from None


def _cstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    if b"\0" in raw:
        raise ValueError("strings in the protocol cannot contain NUL")
    return raw + b"\0"


def _read_cstr(body: bytes, offset: int) -> tuple[str, int]:
    end = body.find(b"\0", offset)
    if end < 0:
        raise ProtocolViolation("string is not terminated")
    try:
        return body[offset:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation("string is not valid UTF-8") from None


# --- frontend messages the gateway decodes during authentication -------------------------


@dataclass(frozen=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        tail = _I32.pack(-1) if self.data is None else _I32.pack(len(self.data)) + self.data
        return Message(b"p", _cstr(self.mechanism) + tail).encode()


def decode_sasl_initial(msg: Message) -> SASLInitialResponse:
    _expect_type(msg, b"p", "SASLInitialResponse")
    mechanism, offset = _read_cstr(msg.body, 0)
    if len(msg.body) < offset + 4:
        raise ProtocolViolation("SASLInitialResponse is truncated")
    (length,) = _I32.unpack_from(msg.body, offset)
    data = msg.body[offset + 4 :]
    if length == -1 and not data:
        return SASLInitialResponse(mechanism, None)
    if length != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    return SASLInitialResponse(mechanism, data)


def decode_sasl_response(msg: Message) -> bytes:
    _expect_type(msg, b"p", "SASLResponse")
    return msg.body


def _expect_type(msg: Message, mtype: bytes, name: str) -> None:
    if msg.type != mtype:
        raise ProtocolViolation(f"expected {name}, got message type {msg.type!r}")


# --- backend messages ---------------------------------------------------------------------

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True)
class Authentication:
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return Message(b"R", _I32.pack(self.code) + self.data).encode()


def auth_sasl(mechanisms: list[str]) -> Authentication:
    return Authentication(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def sasl_mechanisms(event: Authentication) -> list[str]:
    """The mechanisms an AuthenticationSASL offers."""
    return [m.decode("utf-8", "replace") for m in event.data.split(b"\0") if m]


@dataclass(frozen=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return Message(b"S", _cstr(self.name) + _cstr(self.value)).encode()


@dataclass(frozen=True)
class BackendKeyData:
    pid: int
    secret: bytes

    def encode(self) -> bytes:
        return Message(b"K", _U32.pack(self.pid & 0xFFFFFFFF) + self.secret).encode()


@dataclass(frozen=True)
class ReadyForQuery:
    status: bytes = b"I"

    def encode(self) -> bytes:
        return Message(b"Z", self.status).encode()


@dataclass(frozen=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unsupported: tuple[str, ...] = ()

    def encode(self) -> bytes:
        # on the wire this is the whole version number (3 << 16 | minor), as Postgres sends it
        body = _I32.pack((3 << 16) | self.newest_minor) + _I32.pack(len(self.unsupported))
        body += b"".join(_cstr(o) for o in self.unsupported)
        return Message(b"v", body).encode()


# ErrorResponse / NoticeResponse field codes.
FIELD_NAMES = {"S": "severity", "V": "severity_nonlocalized", "C": "code", "M": "message",
               "D": "detail", "H": "hint"}


@dataclass(frozen=True)
class ErrorResponse:
    code: str
    message: str
    severity: str = "FATAL"
    detail: str | None = None
    hint: str | None = None
    notice: bool = False

    def encode(self) -> bytes:
        fields = [("S", self.severity), ("V", self.severity), ("C", self.code), ("M", self.message)]
        if self.detail:
            fields.append(("D", self.detail))
        if self.hint:
            fields.append(("H", self.hint))
        body = b"".join(k.encode() + _cstr(v) for k, v in fields) + b"\0"
        return Message(b"N" if self.notice else b"E", body).encode()


def decode_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    offset = 0
    while offset < len(body) and body[offset] != 0:
        key = chr(body[offset])
        fields[key], offset = _read_cstr(body, offset + 1)
    return fields


def decode_error(msg: Message) -> ErrorResponse:
    f = decode_fields(msg.body)
    return ErrorResponse(code=f.get("C", "XX000"), message=f.get("M", ""),
                         severity=f.get("V", f.get("S", "ERROR")), detail=f.get("D"),
                         hint=f.get("H"), notice=msg.type == b"N")


BackendEvent = Union[Authentication, ParameterStatus, BackendKeyData, ReadyForQuery,
                     NegotiateProtocolVersion, ErrorResponse, Message]


def decode_backend(msg: Message) -> BackendEvent:
    """Decode the messages a backend sends while a session is being set up."""
    body = msg.body
    try:
        if msg.type == b"R":
            return Authentication(_I32.unpack_from(body)[0], body[4:])
        if msg.type == b"S":
            name, offset = _read_cstr(body, 0)
            value, _ = _read_cstr(body, offset)
            return ParameterStatus(name, value)
        if msg.type == b"K":
            return BackendKeyData(_U32.unpack_from(body)[0], body[4:])
        if msg.type == b"Z":
            if len(body) != 1:
                raise ProtocolViolation("ReadyForQuery must carry one status byte")
            return ReadyForQuery(body)
        if msg.type in (b"E", b"N"):
            return decode_error(msg)
        if msg.type == b"v":
            minor, count = struct.unpack_from("!ii", body)
            names, offset = [], 8
            for _ in range(count):
                name, offset = _read_cstr(body, offset)
                names.append(name)
            return NegotiateProtocolVersion(minor & 0xFFFF, tuple(names))
    except struct.error:
        raise ProtocolViolation(f"message type {msg.type!r} is truncated") from None
    return msg
