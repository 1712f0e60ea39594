"""Looking at a client's first bytes without consuming them (MSG_PEEK), so that TLS, or the
gateway they are handed to, still gets them all."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
from dataclasses import dataclass

from gateway.wire.clienthello import NEED_MORE, HelloError, read_hello

log = logging.getLogger("pgsni.server")

MAX_PEEK = 1 << 17  # a ClientHello larger than this is not peeked at (served here)
PEEK_PAUSE = 0.002  # peeking does not consume, so the socket stays readable: wait between peeks


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
        await asyncio.sleep(PEEK_PAUSE)


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
