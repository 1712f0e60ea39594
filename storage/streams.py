"""A bridge from an async stream of byte chunks (a download) to blocking code reading a file
object in a worker thread (extraction): a small bounded queue in between, so the bytes are
consumed as they arrive, with no temporary copy and never all in memory."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import AsyncIterator, BinaryIO, Callable, TypeVar

from .errors import StorageError

T = TypeVar("T")

_DEPTH = 16  # chunks in flight between the loop and the thread


async def feed_thread(chunks: AsyncIterator[bytes], consume: Callable[[BinaryIO], T], *,
                      on_chunk: Callable[[bytes], None] | None = None) -> T:
    """Run `consume(reader)` in a thread, `reader` being a blocking, non-seekable file object
    over `chunks`; return its result. Every chunk received goes to `on_chunk` first (hashing,
    progress), also after `consume` stopped reading. If `consume` fails, the download stops
    and its exception is raised; if the download fails or is cancelled, the reader raises
    in the thread, which is awaited before the error propagates. `chunks` is closed."""
    feed: queue.Queue = queue.Queue(maxsize=_DEPTH)
    stop = threading.Event()

    def run() -> T:
        try:
            return consume(QueueReader(feed, stop))
        finally:
            stop.set()

    worker = asyncio.ensure_future(asyncio.to_thread(run))
    feeding = True
    try:
        async with contextlib.aclosing(chunks) as it:
            async for chunk in it:
                if on_chunk is not None:
                    on_chunk(chunk)
                if worker.done() and worker.exception() is not None:
                    break  # the consumer already failed: stop downloading
                if feeding:
                    # False once the consumer quit (it has read all it wanted); the rest of
                    # the stream still goes to on_chunk
                    feeding = await _offer(feed, chunk, stop)
        if feeding:
            await _offer(feed, None, stop)
        return await worker
    except BaseException:
        stop.set()
        await asyncio.gather(worker, return_exceptions=True)
        raise


async def _offer(feed: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand a chunk to the consuming thread without blocking the loop; False if it quit."""
    while not stop.is_set():
        try:
            feed.put_nowait(item)
            return True
        except queue.Full:
            await asyncio.sleep(0.002)
    return False


class QueueReader:
    """A read-only, non-seekable file object over chunks arriving in a queue (None = EOF)."""

    def __init__(self, feed: queue.Queue, stop: threading.Event) -> None:
        self.feed, self.stop = feed, stop
        self.buf = b""
        self.eof = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.buf) < n):
            try:
                item = self.feed.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():  # the download side gave up
                    raise StorageError("download interrupted") from None
                continue
            if item is None:
                self.eof = True
            else:
                self.buf += item
        if n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out
