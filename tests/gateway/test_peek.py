"""gateway/proxy/peek.py on real sockets: a ClientHello is seen without being consumed, and
waiting for one ends at its deadline, also while nothing arrives at all."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time

from gateway.proxy.peek import hello_is, peek_hello

from .test_clienthello import client_hello


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_a_peeked_hello_stays_for_whoever_reads_next():
    hello = client_hello("app1.db.example.com")

    async def main():
        sock, other = _pair()
        with sock, other:
            other.sendall(hello)
            peeked = await peek_hello(sock, 2.0)
            assert peeked is not None and peeked.server_name == "app1.db.example.com"
            assert peeked.digest == hashlib.sha256(hello).digest()
            assert await hello_is(sock, peeked.digest, 2.0)
            assert not await hello_is(sock, hashlib.sha256(b"another").digest(), 2.0)
            assert sock.recv(len(hello) + 1) == hello  # nothing was consumed
    asyncio.run(main())


def test_waiting_for_a_hello_that_never_comes_ends_at_the_deadline():
    """The holder of a forwarded client waits for its ClientHello (forward.py): a forwarding
    gateway that replies nothing more must not keep that wait, and its socket, forever."""
    async def main():
        sock, other = _pair()
        with sock, other:
            began = time.monotonic()
            assert await asyncio.wait_for(hello_is(sock, b"\0" * 32, 0.3), 5.0) is False
            assert time.monotonic() - began < 2.0
            other.sendall(client_hello("app1.db.example.com")[:20])  # and one cut short
            began = time.monotonic()
            assert await asyncio.wait_for(peek_hello(sock, 0.3), 5.0) is None
            assert time.monotonic() - began < 2.0
    asyncio.run(main())
