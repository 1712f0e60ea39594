"""Internet clients before authentication (SECURITY.md: "may be anyone ... name databases that do
not exist"; floods are limited "with bounded memory"): what a stranger who knows no password
and no database leaves behind in the gateway."""

from __future__ import annotations

import secrets
import socket
import ssl

from gateway.wire import protocol as p

from ..support.harness import DOMAIN


def _stranger(port: int, ca, db_id: str) -> bytes:
    """Direct TLS with the name of a database that does not exist, a startup message, and
    whatever the gateway answers until it closes."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["postgresql"])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname=f"{db_id}.{DOMAIN}") as tls:
        tls.sendall(p.StartupMessage(3, 0, {"user": "postgres", "database": "postgres"}).encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer


def test_names_of_databases_that_do_not_exist_are_not_kept(gateway, tls):
    """Every connection that names a database id made the gateway keep, for good, a lifecycle
    object (`Shared.lives`, via `InstanceManager.database(id)` in the role lookup) and an
    entry in the stored-version cache (`Databases._current`), about 1.6 KB per id, though
    the database exists nowhere: one TLS handshake per id (ids are any DNS label, and an
    unknown database is 3D000, not a failed login, so auth_failures_per_minute never counts
    it) grows the gateway's memory without bound, until the OOM killer ends it and every
    tenant's connections with it."""
    n = 300
    for _ in range(n):
        answer = _stranger(gateway.port, tls["ca"], f"nx{secrets.token_hex(8)}")
        assert b"3D000" in answer, answer[:200]
    gw = gateway.gw
    lives = [i for i in gw.instances.shared.lives if i.startswith("nx")]
    cached = [i for i in gw.databases._current if i.startswith("nx")]
    assert len(lives) < n // 10 and len(cached) < n // 10, \
        f"after {n} logins to databases that do not exist the gateway keeps {len(lives)} lifecycle " \
        f"objects and {len(cached)} cache entries for them"
