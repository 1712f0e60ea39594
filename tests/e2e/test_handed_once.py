"""A client another gateway handed over before its TLS began (a bare link, or a worker's
local channel: gateway/proxy/server.py serve_forwarded) is never handed over again: its
session is marked as come from another gateway, as one handed after its TLS is. Else a
client whose database is known only from its startup message (its server name outside this
gateway's `domains`, when the gateways' settings differ) could take a second hop."""

from __future__ import annotations

import socket
import ssl
import threading

from gateway.proxy import server

from ..support.harness import wait_until


def test_a_client_handed_over_before_its_tls_is_never_handed_over_again(start_gateway, tls, monkeypatch):
    gt = start_gateway()
    seen = []

    class Recorded:  # the session the listener starts, recorded instead of served
        def __init__(self, ctx, conn, info, refusal):
            seen.append(info)

        async def run(self):
            pass
    monkeypatch.setattr(server, "Session", Recorded)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    def client() -> None:  # the client's own TLS, begun after the hand-over
        context = ssl.create_default_context(cafile=tls["ca"])
        with context.wrap_socket(theirs, server_hostname="app1.db.example.com"):
            pass
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    gt.call(lambda: gt.gw.listener.serve_forwarded(ours, "192.0.2.7:5000", direct=False))
    thread.join(10)
    wait_until(lambda: seen, timeout=5, what="the session")
    assert seen[0].peer == "192.0.2.7:5000" and seen[0].tls and seen[0].handed
