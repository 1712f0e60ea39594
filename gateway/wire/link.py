"""The gateway-to-gateway link protocol, sans IO: the opening side sends one `Request` naming
its kind, the other answers one `Reply`; a kind that carries a stream (the later forwarding of
a client connection) goes on with raw bytes after that, which `LinkReader.rest()` hands over.

Every message is a frame: a 4-byte big-endian length of what follows, then a type byte:
- `R` Request: the magic `pgsni-link`, a version byte, the kind's name (a length byte and
  ASCII), then the kind's payload (for `cancel`: the backend pid, 4 bytes, and the secret,
  4 to 256 bytes, as in a CancelRequest; for `forward`: a byte saying how the client opened
  TLS, 1 direct or 0 after an SSLRequest the forwarding gateway answered, a byte giving the
  length (0 or 32) of the SHA-256 of the client's ClientHello records that follows it (the
  holder checks that the bare stream begins with exactly those), then the client's address
  as ASCII, `host:port`; for `session`: four fields, each a 2-byte big-endian length
  and UTF-8, the client's address, its TLS version, its cipher and the certificate (PEM) its
  TLS was ended with, for channel binding).
- `A` Reply: a status byte (0 done, 1 refused) and a UTF-8 text (empty when done).
Anything else is a LinkError, raised before any of it is acted on.

Every message travels inside the link's mutual TLS. A `forward` link opens with one byte,
`B`, before that TLS: its stream, after the reply, is the client's own TLS and crosses the
connection bare (gateway/proxy/bare_link.py); every other link opens with the TLS at once."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .protocol import CancelRequest

MAGIC = b"pgsni-link"
VERSION = 1
MAX_FRAME = 16384  # a request or reply is small (a certificate at most); a stream follows a frame
MIN_SECRET, MAX_SECRET = 4, 256  # as a CancelRequest's secret (protocol 3.0 to 3.2)

_LEN = struct.Struct("!I")
_PID = struct.Struct("!I")


class LinkError(ValueError):
    """A malformed or unexpected link message; the text says what was wrong."""


class Kind(enum.Enum):
    CANCEL = "cancel"  # a CancelRequest forwarded by another gateway: look up locally only
    FORWARD = "forward"  # a client's connection, its TLS not begun: serve it here, never forward again
    # a client whose TLS the forwarding gateway ended, its startup message next on the link
    # (it named its database in the startup message only): serve it here, never forward again
    SESSION = "session"


class Status(enum.IntEnum):
    DONE = 0
    REFUSED = 1


@dataclass(frozen=True)
class Request:
    kind: Kind
    payload: bytes = b""

    def encode(self) -> bytes:
        name = self.kind.value.encode("ascii")
        return _frame(b"R" + MAGIC + bytes([VERSION, len(name)]) + name + self.payload)


@dataclass(frozen=True)
class Reply:
    status: Status = Status.DONE
    text: str = ""

    def encode(self) -> bytes:
        return _frame(b"A" + bytes([self.status]) + self.text.encode()[:MAX_FRAME - 16])


def _frame(content: bytes) -> bytes:
    if len(content) > MAX_FRAME:
        raise LinkError(f"a link message of {len(content)} bytes is over the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(content)) + content


# --- payloads ------------------------------------------------------------------------------------
def cancel_request(request: CancelRequest) -> Request:
    return Request(Kind.CANCEL, _PID.pack(request.pid & 0xFFFFFFFF) + request.secret)


def cancel_payload(payload: bytes) -> CancelRequest:
    secret = payload[_PID.size:]
    if len(payload) < _PID.size or not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise LinkError(f"a cancel payload is a 4-byte pid and a {MIN_SECRET}-{MAX_SECRET} byte "
                        f"secret, not {len(payload)} bytes")
    return CancelRequest(_PID.unpack_from(payload)[0], secret)


MAX_PEER = 200  # a client address in a forward request


HELLO_DIGEST = 32  # a SHA-256


@dataclass(frozen=True)
class Forwarded:
    """A client connection handed over by another gateway: where it comes from, whether it
    opened with TLS at once (direct) or after an SSLRequest (answered already), and the
    SHA-256 of the ClientHello records the forwarding gateway saw (b"": not given)."""

    peer: str
    direct: bool
    hello: bytes = b""


def forward_request(forwarded: Forwarded) -> Request:
    if len(forwarded.hello) not in (0, HELLO_DIGEST):
        raise LinkError(f"a ClientHello digest is {HELLO_DIGEST} bytes, not {len(forwarded.hello)}")
    peer = forwarded.peer.encode("ascii", "replace")[:MAX_PEER]
    return Request(Kind.FORWARD, bytes([1 if forwarded.direct else 0, len(forwarded.hello)])
                   + forwarded.hello + peer)


def forward_payload(payload: bytes) -> Forwarded:
    digest = payload[1] if len(payload) > 1 else 0
    if digest not in (0, HELLO_DIGEST):
        raise LinkError(f"a forward payload's ClientHello digest is 0 or {HELLO_DIGEST} bytes, not {digest}")
    if not 3 + digest <= len(payload) <= 2 + digest + MAX_PEER or payload[0] not in (0, 1):
        raise LinkError(f"a forward payload is a 0/1 byte, a digest length and digest, and a client "
                        f"address of 1-{MAX_PEER} bytes, not {len(payload)} bytes")
    try:
        peer = payload[2 + digest:].decode("ascii")
    except UnicodeDecodeError:
        raise LinkError("a forwarded client's address is not ASCII") from None
    if not peer.isprintable():
        raise LinkError("a forwarded client's address has control characters")
    return Forwarded(peer, payload[0] == 1, payload[2:2 + digest])


@dataclass(frozen=True)
class HandedSession:
    """A client session handed over after its TLS ended at the forwarding gateway: what the
    holder's session needs to know of that TLS (the certificate, for channel binding)."""

    peer: str
    tls_version: str
    cipher: str
    cert_pem: str


_FIELD = struct.Struct("!H")


def session_request(session: HandedSession) -> Request:
    fields = (session.peer[:MAX_PEER], session.tls_version, session.cipher, session.cert_pem)
    return Request(Kind.SESSION, b"".join(_FIELD.pack(len(b)) + b for b in (f.encode() for f in fields)))


def session_payload(payload: bytes) -> HandedSession:
    fields, at = [], 0
    for _ in range(4):
        if at + _FIELD.size > len(payload):
            raise LinkError("a session payload ends inside a field")
        (n,) = _FIELD.unpack_from(payload, at)
        at += _FIELD.size
        if at + n > len(payload):
            raise LinkError("a session payload ends inside a field")
        try:
            value = payload[at:at + n].decode()
        except UnicodeDecodeError:
            raise LinkError("a session payload field is not UTF-8") from None
        fields.append(value)
        at += n
    if at != len(payload):
        raise LinkError(f"{len(payload) - at} bytes after a session payload's fields")
    peer = fields[0]
    if not 1 <= len(peer) <= MAX_PEER or not peer.isprintable() or not all(f.isprintable() for f in fields[1:3]):
        raise LinkError("a handed session's client address or TLS names are malformed")
    return HandedSession(*fields)


# --- decoding ------------------------------------------------------------------------------------
class LinkReader:
    """Bytes in (`receive_data`), one message out (`next_message`: None until it is whole).
    After that message, whatever else arrived belongs to the stream (`rest`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> Request | Reply | None:
        if self._done:
            raise LinkError("a link carries one message; what follows is its stream")
        if len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if not 1 <= length <= MAX_FRAME:
                raise LinkError(f"link message length {length} is outside 1-{MAX_FRAME}")
        if len(self._buf) < _LEN.size or len(self._buf) < _LEN.size + length:
            return None
        content = bytes(self._buf[_LEN.size:_LEN.size + length])
        del self._buf[:_LEN.size + length]
        self._done = True
        return _decode(content)

    def rest(self) -> bytes:
        """Bytes received after the message: the start of its stream."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


def _decode(content: bytes) -> Request | Reply:
    tag, body = content[:1], content[1:]
    if tag == b"A":
        if not body or body[0] not in Status._value2member_map_:
            raise LinkError("a link reply without a known status")
        try:
            return Reply(Status(body[0]), body[1:].decode())
        except UnicodeDecodeError:
            raise LinkError("a link reply's text is not UTF-8") from None
    if tag != b"R":
        raise LinkError(f"unknown link message type {tag!r}: not a pgsni gateway link")
    if not body.startswith(MAGIC):
        raise LinkError("a link request without the pgsni-link magic: not a pgsni gateway")
    body = body[len(MAGIC):]
    if len(body) < 2:
        raise LinkError("a link request cut short before its kind")
    if body[0] != VERSION:
        raise LinkError(f"link protocol version {body[0]} is not supported (this gateway speaks {VERSION})")
    size = body[1]
    name = body[2:2 + size]
    if len(name) < size:
        raise LinkError("a link request cut short inside its kind")
    try:
        kind = Kind(name.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise LinkError(f"unknown link request kind {name[:40]!r}") from None
    return Request(kind, body[2 + size:])
