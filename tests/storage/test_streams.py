"""The download-to-thread bridge used by restore and `db create --from`."""

from __future__ import annotations

import threading

import pytest

from storage.errors import StorageError
from storage.streams import feed_thread


class Chunks:
    """An async chunk source that records how far it was read and whether it was closed."""

    def __init__(self, count: int, size: int = 1000, fail_at: int | None = None) -> None:
        self.count, self.size, self.fail_at = count, size, fail_at
        self.sent = 0
        self.closed = False

    async def __call__(self):
        try:
            for i in range(self.count):
                if i == self.fail_at:
                    raise ConnectionError("network went away")
                self.sent += 1
                yield bytes([i % 256]) * self.size
        finally:
            self.closed = True


async def test_bytes_arrive_in_order_and_every_chunk_is_seen():
    source = Chunks(50)
    seen = []

    def consume(reader) -> bytes:
        assert threading.current_thread() is not threading.main_thread()
        out = b""
        while data := reader.read(777):  # reads that straddle chunk boundaries
            out += data
        return out

    got = await feed_thread(source(), consume, on_chunk=lambda c: seen.append(len(c)))
    assert got == b"".join(bytes([i]) * 1000 for i in range(50))
    assert seen == [1000] * 50
    assert source.closed


async def test_a_failing_consumer_stops_the_download():
    source = Chunks(100_000)

    def consume(reader) -> None:
        reader.read(10)
        raise ValueError("bad archive")

    with pytest.raises(ValueError, match="bad archive"):
        await feed_thread(source(), consume)
    assert source.closed
    assert source.sent < 1000  # not read to the end


async def test_a_failing_download_ends_the_consumer_and_propagates():
    source = Chunks(100, fail_at=40)
    consumer_saw: list[BaseException] = []

    def consume(reader) -> None:
        try:
            while reader.read(4096):
                pass
        except StorageError as e:
            consumer_saw.append(e)
            raise

    with pytest.raises(ConnectionError, match="network went away"):
        await feed_thread(source(), consume)
    assert [str(e) for e in consumer_saw] == ["download interrupted"]  # the thread ended first
