"""The streaming replication codec (gateway/wire/replication.py): what the WAL receiver reads
inside CopyBoth and writes back, byte for byte as Postgres' protocol documentation lays it out."""

from __future__ import annotations

import struct

import pytest

from gateway.wire import replication as repl
from gateway.wire.protocol import Message, ProtocolViolation


def test_xlogdata_and_keepalive_are_decoded():
    payload = b"w" + struct.pack("!QQq", 0x1_0000_0100, 0x1_0000_0200, 12345) + b"walbytes"
    event = repl.decode_copy_data(payload)
    assert event == repl.XLogData(0x1_0000_0100, 0x1_0000_0200, b"walbytes")
    assert event.end == 0x1_0000_0108
    keepalive = repl.decode_copy_data(b"k" + struct.pack("!QqB", 0x500, 1, 1))
    assert keepalive == repl.Keepalive(0x500, True)


@pytest.mark.parametrize("payload", [b"w" + bytes(10), b"k" + bytes(3), b"x" + bytes(20), b""])
def test_truncated_or_unknown_messages_are_refused(payload):
    with pytest.raises(ProtocolViolation):
        repl.decode_copy_data(payload)


def test_status_update_says_written_and_flushed():
    raw = repl.status_update(0x2000, 0x1000, reply=True, clock=repl.POSTGRES_EPOCH + 2.5)
    assert raw[:1] == b"d" and struct.unpack("!i", raw[1:5])[0] == len(raw) - 1
    kind, written, flushed, applied, clock, reply = struct.unpack("!cQQQqB", raw[5:])
    assert (kind, written, flushed, applied, clock, reply) == (b"r", 0x2000, 0x1000, 0x1000, 2_500_000, 1)


def test_data_rows_keep_raw_columns_and_nulls():
    body = struct.pack("!h", 3) + struct.pack("!i", 3) + b"abc" + struct.pack("!i", -1) + struct.pack("!i", 0)
    assert repl.data_row(Message(b"D", body)) == [b"abc", None, b""]
    with pytest.raises(ProtocolViolation):
        repl.data_row(Message(b"D", struct.pack("!h", 1) + struct.pack("!i", 10) + b"short"))


def test_queries_are_simple_query_messages():
    assert repl.query("IDENTIFY_SYSTEM") == b"Q" + struct.pack("!i", 4 + 16) + b"IDENTIFY_SYSTEM\0"
    assert repl.copy_done() == b"c\0\0\0\4"
