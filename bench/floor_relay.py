"""The least a Python TLS relay can do, for `python -m bench floor`: uvloop, TLS by the loop,
raw bytes both ways to a Postgres unix socket (which trusts local logins), with flow control —
no SNI, no authentication, no parsing, no metrics. Its TPS is the ceiling any relay written
like pgsni's can reach on the machine. Several processes may share the port (SO_REUSEPORT).

    python -m bench.floor_relay PORT UNIX_SOCKET CERT KEY
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import sys

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


async def _serve_client(ctx: ssl.SSLContext, unix_path: str, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    # the backend first: Postgres says nothing before the client's startup message, so the
    # client side can forward from its first byte
    client, backend = _Side(), _Side()
    client.peer, backend.peer = backend, client
    try:
        if await loop.sock_recv(sock, 8) != SSL_REQUEST:
            sock.close()
            return
        await loop.sock_sendall(sock, b"S")
        await loop.create_unix_connection(lambda: backend, unix_path)
        await loop.connect_accepted_socket(lambda: client, sock, ssl=ctx)
    except (OSError, ssl.SSLError):
        sock.close()
        if backend.transport is not None:
            backend.transport.close()


async def main(port: int, unix_path: str, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(512)
    listener.setblocking(False)
    print("ready", flush=True)  # for the harness: this process accepts on the shared port now
    loop = asyncio.get_running_loop()
    tasks = set()
    while True:
        sock, _ = await loop.sock_accept(listener)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.ensure_future(_serve_client(ctx, unix_path, sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
