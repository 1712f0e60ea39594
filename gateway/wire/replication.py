"""Sans-IO codec for physical streaming replication (Postgres' streaming replication protocol
inside CopyBoth): what the gateway's WAL receiver reads and writes on a replication
connection. Framing of the outer messages is `protocol.MessageReader`'s.

Inside CopyData ('d') the server sends
    'w' XLogData:  Int64 start, Int64 server's WAL end, Int64 send time, the WAL bytes
    'k' keepalive: Int64 server's WAL end, Int64 send time, Byte1 reply requested
and the standby answers with
    'r' status:    Int64 written, Int64 flushed, Int64 applied, Int64 clock, Byte1 reply wanted
(LSNs as unsigned 64-bit integers; times in microseconds since 2000-01-01 UTC).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from .protocol import Message, ProtocolViolation

POSTGRES_EPOCH = 946_684_800  # 2000-01-01 in Unix seconds
_XLOG = struct.Struct("!cQQq")
_KEEPALIVE = struct.Struct("!cQqB")
_STATUS = struct.Struct("!cQQQqB")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


@dataclass(frozen=True)
class XLogData:
    start: int
    wal_end: int
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass(frozen=True)
class Keepalive:
    wal_end: int
    reply_requested: bool


def decode_copy_data(payload: bytes) -> XLogData | Keepalive:
    """One CopyData payload the server sends during START_REPLICATION."""
    kind = payload[:1]
    try:
        if kind == b"w":
            _, start, wal_end, _ = _XLOG.unpack_from(payload)
            return XLogData(start, wal_end, payload[_XLOG.size:])
        if kind == b"k":
            _, wal_end, _, reply = _KEEPALIVE.unpack_from(payload)
            return Keepalive(wal_end, bool(reply))
    except struct.error:
        raise ProtocolViolation(f"replication message {kind!r} is truncated") from None
    raise ProtocolViolation(f"unexpected replication message {kind!r}")


def now_micros(clock: float | None = None) -> int:
    return int(((time.time() if clock is None else clock) - POSTGRES_EPOCH) * 1_000_000)


def status_update(written: int, flushed: int, *, reply: bool = False, clock: float | None = None) -> bytes:
    """A standby status update as a CopyData message (applied = flushed: nothing replays here)."""
    body = _STATUS.pack(b"r", written, flushed, flushed, now_micros(clock), int(reply))
    return Message(b"d", body).encode()


def query(sql: str) -> bytes:
    """A simple-query message (the replication commands are plain queries)."""
    return Message(b"Q", sql.encode() + b"\0").encode()


def copy_done() -> bytes:
    return Message(b"c", b"").encode()


def data_row(msg: Message) -> list[bytes | None]:
    """The columns of a DataRow, raw (a replication command's result is text, or a file's bytes)."""
    body = msg.body
    try:
        (count,), offset, cols = _I16.unpack_from(body), 2, []
        for _ in range(count):
            (length,) = _I32.unpack_from(body, offset)
            offset += 4
            if length < 0:
                cols.append(None)
                continue
            if offset + length > len(body):
                raise struct.error
            cols.append(body[offset:offset + length])
            offset += length
    except struct.error:
        raise ProtocolViolation("a DataRow is truncated") from None
    return cols

