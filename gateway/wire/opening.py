"""The opening of a client connection, sans IO: its first bytes say whether TLS starts at
once (direct TLS, Postgres 17+), is asked for (SSLRequest), GSSAPI encryption is asked for
(refused: the client then carries on), or a message the reader takes as it is (a startup
packet or a CancelRequest)."""

from __future__ import annotations

import enum
import struct

from .protocol import GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, TLS_HANDSHAKE_BYTE

HEAD = 8  # bytes that tell an SSLRequest or GSSENCRequest from the rest


class Opening(enum.Enum):
    DIRECT_TLS = "direct TLS"  # a TLS ClientHello: hand the socket to TLS untouched
    SSL_REQUEST = "SSLRequest"  # answer 'S', then TLS
    GSSENC_REQUEST = "GSSENCRequest"  # answer 'N', then read the next opening
    MESSAGE = "message"  # a startup packet or CancelRequest, for protocol.MessageReader


def is_direct_tls(first: bytes) -> bool:
    """From the first byte alone (peeked, so that TLS still sees it)."""
    return bool(first) and first[0] == TLS_HANDSHAKE_BYTE


def classify(head: bytes) -> Opening:
    """The opening that `HEAD` bytes (not a TLS ClientHello) begin."""
    if len(head) < HEAD:
        raise ValueError(f"an opening is told from {HEAD} bytes, not {len(head)}")
    length, code = struct.unpack_from("!ii", head)
    if length == HEAD and code == SSL_REQUEST_CODE:
        return Opening.SSL_REQUEST
    if length == HEAD and code == GSSENC_REQUEST_CODE:
        return Opening.GSSENC_REQUEST
    return Opening.MESSAGE
