"""TCP sockets by hand (non-blocking, for the loop's sock_* calls and connect_accepted_socket):
connecting to a remote route's server and to another gateway's links, and the accept loop of
the public listener and of the links' listener."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

log = logging.getLogger("pgsni.server")

ACCEPT_PAUSE = 0.1  # after a failed accept (EMFILE and friends): back off instead of spinning


async def connect_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket with TCP_NODELAY, to the first of `host`'s addresses
    that accepts; the last address's OSError if none does."""
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
        return sock
    raise error or OSError(f"{host} has no address")


async def accept_forever(listening: socket.socket, take: Callable[[socket.socket, str], None],
                         what: str) -> None:
    """Accept connections on `listening` until cancelled, handing each to `take(socket,
    address as HOST:PORT)`; a failed accept is logged (`what`: whose) and retried."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, address = await loop.sock_accept(listening)
        except OSError as e:
            log.error("accepting %s failed: %s", what, e)
            await asyncio.sleep(ACCEPT_PAUSE)
            continue
        take(sock, address_text(address))


def address_text(address) -> str:
    """A socket address as HOST:PORT (as the socket gives it, if it is no (host, port))."""
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
