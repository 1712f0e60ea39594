"""TCP sockets by hand (non-blocking, for the loop's sock_* calls and connect_accepted_socket):
connecting to a remote route's server and to another gateway's links, and the accept loop of
the public listener and of the links' listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Callable

log = logging.getLogger("pgsni.server")

ACCEPT_PAUSE = 0.1  # after a failed accept (EMFILE and friends): back off instead of spinning
# TCP keepalive (`keep_alive`): probes after this many idle seconds, this far apart, this many
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 60, 10, 6


def keep_alive(sock) -> None:
    """TCP keepalive on a connection that may stay open and silent for hours (a client's
    session, a link that carries one): a peer that vanished without a word (its host died, a
    NAT or load balancer forgot the flow) is noticed within about two minutes and its session
    ends, instead of holding a backend, and an instance that then never goes idle, for ever.
    Postgres turns keepalive on for its own TCP clients too (with the system's timings, two
    hours before the first probe on Linux). Not for unix sockets."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # closed meanwhile
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def connect_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket with TCP_NODELAY and keepalive, to the first of
    `host`'s addresses that accepts; the last address's OSError if none does."""
    loop = asyncio.get_running_loop()
    error: OSError | None = None
    for family, kind, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive(sock)
        return sock
    raise error or OSError(f"{host} has no address")


async def accept_forever(listening: socket.socket, take: Callable[[socket.socket, str], None],
                         what: str) -> None:
    """Accept connections on `listening` until cancelled, handing each to `take(socket,
    address as HOST:PORT)` with keepalive on; a failed accept is logged (`what`: whose) and
    retried."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, address = await loop.sock_accept(listening)
        except OSError as e:
            log.error("accepting %s failed: %s", what, e)
            await asyncio.sleep(ACCEPT_PAUSE)
            continue
        keep_alive(sock)
        take(sock, address_text(address))


def address_text(address) -> str:
    """A socket address as HOST:PORT (as the socket gives it, if it is no (host, port))."""
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
