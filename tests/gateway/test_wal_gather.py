"""How long the WAL receiver lets WAL gather between batches (gateway/compute/walreceiver.py
gather_seconds): as long as GATHER_BYTES take at the rate the last batch came, within bounds."""

from __future__ import annotations

import asyncio

import pytest

from gateway.compute.walreceiver import GATHER_BYTES, MIN_LINGER, WalReceiver, gather_seconds

MOST = 0.05


def test_a_trickle_of_commits_waits_the_longest():
    assert gather_seconds(200, 0.01, MOST) == MOST  # one small commit: 20 kB/s
    assert gather_seconds(GATHER_BYTES // 10, 0.05, MOST) == MOST


@pytest.mark.parametrize("rate", [1 << 20, 3 << 20, 8 << 20])
def test_a_steady_stream_waits_as_long_as_the_gathered_bytes_take(rate):
    elapsed = 0.05
    seconds = gather_seconds(int(rate * elapsed), elapsed, MOST)
    assert seconds == pytest.approx(min(MOST, GATHER_BYTES / rate), rel=1e-3)
    assert seconds * rate <= GATHER_BYTES * 1.001  # never more than GATHER_BYTES left unread


def test_a_bulk_load_is_taken_as_it_comes():
    assert gather_seconds(4 << 20, 0.05, MOST) == 0.0  # 80 MB/s: under MIN_LINGER
    assert GATHER_BYTES / (80 << 20) < MIN_LINGER


def test_never_while_commits_wait_for_the_receiver():
    assert gather_seconds(200, 1.0, 0.0) == 0.0  # durability=sync: linger() is 0
    assert gather_seconds(0, 1.0, MOST) == 0.0


async def test_a_receiver_closed_during_a_batch_ends_without_lingering(tmp_path):
    """close() (the spool's budget, a stop) may run while a batch is written in a worker
    thread: the gathering that follows must not touch the closed connection."""
    receiver = WalReceiver(tmp_path, tmp_path, 16 << 20, flushed=lambda written, synced: 0, linger=lambda: MOST)
    await receiver.close()
    await asyncio.wait_for(receiver._gather(200, 1.0), 0.01)
