"""`PgConnection`: an asyncio.Protocol for one side of a session (client or backend).

Before login it frames incoming bytes with the sans-IO reader and hands events to a
coroutine (`next_event`). After `link()` it forwards raw bytes to its peer as they arrive,
with flow control: when the peer's write buffer is full, this side stops reading."""

from __future__ import annotations

import asyncio

from gateway.wire import protocol as p


# how long a closing TLS connection waits for the other side's close_notify; a side that
# does not read (an idle client, a remote whose reading is paused) never sends it, and without
# a bound the transport would linger for the loop's 30 s default
TLS_SHUTDOWN_TIMEOUT = 2.0


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke) before the exchange finished."""


class PgConnection(asyncio.Protocol):
    def __init__(self, reader: p.MessageReader, *, prefix: bytes = b"") -> None:
        self.reader = reader
        if prefix:
            reader.receive_data(prefix)
        self.transport: asyncio.Transport | None = None
        self.peer: PgConnection | None = None
        self.bytes_in = 0
        self.bytes_out = 0  # written to this side (gateway messages and forwarded bytes)
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._read_paused = False
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None:
            peer.bytes_out += len(data)
            peer.transport.write(data)  # type: ignore[union-attr]
            return
        self.reader.receive_data(data)
        # a handshake never needs more than one message buffered; don't let a client queue more
        if self.reader.buffered > self.reader.max_length + 16 and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # flushes what is buffered, then closes
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()  # type: ignore[union-attr]

    # --- handshake phase ------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_event(self) -> p.Event:
        while True:
            event = self.reader.next_event()
            if event is not p.NEED_DATA:
                return event  # type: ignore[return-value]
            if self._eof:
                raise ConnectionClosed()
            if self._read_paused:
                self._read_paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_closed(self) -> bool:
        return self.closed.done()


def link(a: PgConnection, b: PgConnection) -> None:
    """Switch both sides to raw forwarding. Bytes either side had already received but not
    consumed (a client pipelining its first query, say) are forwarded first."""
    a.peer, b.peer = b, a
    for src, dst in ((a, b), (b, a)):
        pending = src.reader.take_buffer()
        if pending:
            dst.send(pending)
        if src._read_paused:
            src._read_paused = False
            src.transport.resume_reading()  # type: ignore[union-attr]
    for src, dst in ((a, b), (b, a)):
        if src.is_closed or src._eof:
            dst.close()
