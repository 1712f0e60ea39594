"""Looking at a client's first bytes without consuming them (MSG_PEEK), so that TLS, or the
gateway they are handed to, still gets them all."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
from dataclasses import dataclass

from gateway.wire.clienthello import NEED_MORE, HelloError, read_hello

log = logging.getLogger("pgsni.server")

MAX_PEEK = 1 << 17  # a ClientHello larger than this is not peeked at (served here)
PEEK_PAUSE = 0.002  # peeking does not consume, so the socket stays readable: wait between peeks
PEEK_PAUSE_MAX = 0.25  # while a readable socket brings nothing new


async def peek_first(sock: socket.socket) -> bytes:
    """The first byte waiting on `sock` (b"": the client closed)."""
    loop = asyncio.get_running_loop()
    while True:
        await readable(loop, sock)
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue


@dataclass(frozen=True)
class PeekedHello:
    server_name: str | None  # None: the client sent none
    digest: bytes  # SHA-256 of the records that carry the ClientHello


async def peek_hello(sock: socket.socket, timeout: float) -> PeekedHello | None:
    """The ClientHello waiting on `sock`, without consuming it; None when it is malformed
    (TLS will then say so), too large, or does not come in time."""
    try:
        async with asyncio.timeout(timeout):
            return await _peek_hello(sock)
    except TimeoutError:
        return None


async def _peek_hello(sock: socket.socket) -> PeekedHello | None:
    loop = asyncio.get_running_loop()
    seen, pause = 0, PEEK_PAUSE
    try:
        while True:
            await readable(loop, sock)
            try:
                data = sock.recv(MAX_PEEK, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not data:
                return None
            try:
                hello = read_hello(data)
            except HelloError as e:
                log.debug("a ClientHello not peeked at: %s", e)
                return None
            if hello is not NEED_MORE:
                return PeekedHello(hello.server_name, hashlib.sha256(data[:hello.length]).digest())
            if len(data) >= MAX_PEEK:
                return None
            # what was peeked at stays queued, so the socket stays readable: wake only once more
            # has come; a socket readable without more (the client shut its side, or one that
            # ignores the mark) is looked at less and less often, not every PEEK_PAUSE
            pause = PEEK_PAUSE if len(data) > seen else min(2 * pause, PEEK_PAUSE_MAX)
            seen = len(data)
            _readable_at(sock, seen + 1)
            await asyncio.sleep(pause)
    finally:
        _readable_at(sock, 1)  # the default again, for TLS or whoever reads it next


def _readable_at(sock: socket.socket, size: int) -> None:
    """The loop sees `sock` readable only once `size` bytes are queued (SO_RCVLOWAT; TCP
    honours it for poll, a unix socket does not). Else a client that sends part of a
    ClientHello and then nothing would wake this gateway every PEEK_PAUSE until its deadline."""
    with contextlib.suppress(OSError):  # closed meanwhile
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)


async def hello_is(sock: socket.socket, digest: bytes, timeout: float) -> bool:
    """Whether the ClientHello waiting on `sock` (not consumed) is the one with SHA-256
    `digest`: what a forwarding gateway saw is what arrived (forward.py)."""
    peeked = await peek_hello(sock, timeout)
    return peeked is not None and hmac.compare_digest(peeked.digest, digest)


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)
