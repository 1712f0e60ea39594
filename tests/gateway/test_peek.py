"""gateway/proxy/peek.py on real sockets: a ClientHello is seen without being consumed, and
waiting for one ends at its deadline, also while nothing arrives at all."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time

from gateway.proxy import peek
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


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        other = socket.create_connection(listener.getsockname())
        sock, _ = listener.accept()
    sock.setblocking(False)
    return sock, other


def test_a_hello_cut_short_costs_no_polling_while_it_waits(monkeypatch):
    """Peeked bytes stay queued, so the socket stays readable: a client (on the public port,
    before any limit but the connection caps) that sends part of its ClientHello and then
    nothing, or then shuts its side, must not make the gateway look at the socket every few
    milliseconds until handshake_timeout. The rest, when it comes, is seen at once, and the
    socket is left as it was for TLS."""
    peeks = []
    real = peek.read_hello
    monkeypatch.setattr(peek, "read_hello", lambda data: peeks.append(len(data)) or real(data))
    hello = client_hello("app1.db.example.com")

    async def main():
        sock, other = _tcp_pair()
        with sock, other:
            other.sendall(hello[:20])
            waiting = asyncio.create_task(peek_hello(sock, 5.0))
            await asyncio.sleep(0.5)
            assert len(peeks) <= 3, f"{len(peeks)} peeks in 0.5 s at a stalled ClientHello"
            other.sendall(hello[20:])
            peeked = await asyncio.wait_for(waiting, 1.0)
            assert peeked is not None and peeked.server_name == "app1.db.example.com"
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            assert sock.recv(len(hello) + 1) == hello
        peeks.clear()
        sock, other = _tcp_pair()
        with sock, other:
            other.sendall(hello[:20])
            other.shutdown(socket.SHUT_WR)  # readable for good, and nothing more will come
            assert await peek_hello(sock, 1.0) is None
            assert len(peeks) <= 15, f"{len(peeks)} peeks in 1 s at a closed, cut-short ClientHello"
    asyncio.run(main())
