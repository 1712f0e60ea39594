"""The server name a TLS ClientHello asks for, sans IO: read from bytes peeked off a socket,
before any TLS library has seen them, so that a gateway can tell which database a client
wants and hand the untouched TLS stream to the gateway that holds it (the client's TLS then
ends there, and SCRAM with channel binding runs between the client and that gateway).

`read_hello(data)` takes the first bytes of the stream (TLS records) and returns
`NEED_MORE` while the ClientHello is not complete in them, else a `Hello` with the server
name (None when the client sent none) and how many bytes its records take. Everything is
bounds-checked: malformed or oversized input raises `HelloError`, never a wrong answer.

Layout (RFC 8446 sections 4.1.2 and 5.1, RFC 6066 section 3): records of type 22 carry the
handshake message, possibly split over several records; the ClientHello's extensions hold
`server_name` (type 0) with a list of names, of which the `host_name` (type 0) one counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
NAME_HOST = 0
MAX_RECORD = 1 << 14  # a plaintext record's largest fragment
MAX_HELLO = 1 << 16  # a ClientHello larger than this is refused (post-quantum ones are ~2 KiB)

_RECORD = struct.Struct("!BHH")  # type, legacy version, length


class HelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello."""


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()


@dataclass(frozen=True)
class Hello:
    server_name: str | None  # lower case, no trailing dot; None: the client sent no SNI
    length: int  # bytes of the records that carry the ClientHello


def read_hello(data: bytes) -> Hello | _NeedMore:
    """The ClientHello at the start of `data` (see the module doc)."""
    handshake, pos = bytearray(), 0
    while True:
        if len(data) - pos < _RECORD.size:
            return NEED_MORE
        kind, _, length = _RECORD.unpack_from(data, pos)
        if kind != RECORD_HANDSHAKE:
            raise HelloError(f"TLS record of type {kind}, expected a handshake (22)")
        if length == 0 or length > MAX_RECORD:
            raise HelloError(f"TLS record of {length} bytes")
        if len(data) - pos - _RECORD.size < length:
            return NEED_MORE
        handshake += data[pos + _RECORD.size:pos + _RECORD.size + length]
        pos += _RECORD.size + length
        if len(handshake) >= 4:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(f"handshake message of type {handshake[0]}, expected a ClientHello (1)")
            size = int.from_bytes(handshake[1:4], "big")
            if size > MAX_HELLO:
                raise HelloError(f"ClientHello of {size} bytes")
            if len(handshake) >= 4 + size:
                return Hello(_server_name(bytes(handshake[4:4 + size])), pos)
        if pos > 2 * MAX_HELLO:  # tiny records: their headers count too
            raise HelloError("ClientHello spread over too many records")


class _Reader:
    """Bounds-checked reads from one ClientHello body."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise HelloError("ClientHello ends inside a field")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> "_Reader":
        return _Reader(self.take(self.number(length_size)))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _server_name(body: bytes) -> str | None:
    hello = _Reader(body)
    hello.take(2 + 32)  # legacy version, random
    hello.vector(1)  # legacy session id
    hello.vector(2)  # cipher suites
    hello.vector(1)  # compression methods
    if hello.left == 0:
        return None  # no extensions at all
    extensions = hello.vector(2)
    if hello.left:
        raise HelloError("bytes after the ClientHello's extensions")
    name, seen = None, set()
    while extensions.left:
        kind = extensions.number(2)
        content = extensions.vector(2)
        if kind in seen:
            raise HelloError(f"extension {kind} sent twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _host_name(content)
    return name


def _host_name(content: _Reader) -> str | None:
    names = content.vector(2)
    if content.left:
        raise HelloError("bytes after the server_name list")
    found = None
    while names.left:
        kind = names.number(1)
        value = names.vector(2)
        raw = value.take(value.left)
        if kind != NAME_HOST:
            continue
        if found is not None:
            raise HelloError("two host names in server_name")
        if not raw or len(raw) > 253:
            raise HelloError(f"host name of {len(raw)} bytes in server_name")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise HelloError("host name in server_name is not ASCII") from None
        if not all(c.isalnum() or c in "-._" for c in text):
            raise HelloError("host name in server_name has characters a DNS name cannot have")
        found = text.lower().rstrip(".")
    return found
