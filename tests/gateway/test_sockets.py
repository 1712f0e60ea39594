"""TCP keepalive on the gateway's long-lived TCP connections (gateway/proxy/sockets.py): a
client or gateway that vanished without a word (its host died, a NAT forgot the flow) must
not hold a session, and with it an instance that never goes idle, for ever."""

from __future__ import annotations

import asyncio
import socket

from gateway.proxy.sockets import KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, accept_forever, connect_tcp


def keepalive(sock) -> tuple[int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


async def test_accepted_and_outgoing_connections_are_kept_alive():
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    accepted: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(accept_forever(listening, lambda sock, address: accepted.put_nowait(sock), "test"))
    try:
        out = await connect_tcp("127.0.0.1", listening.getsockname()[1])
        inbound = await asyncio.wait_for(accepted.get(), 5)
        expected = (1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES)
        assert keepalive(inbound) == expected
        assert keepalive(out) == expected
        assert KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES <= 300  # noticed within minutes
        out.close()
        inbound.close()
    finally:
        task.cancel()
        listening.close()
