"""Cancel keys. A client is told its real backend's pid (libraries use it: pg_terminate_backend,
pg_stat_activity, skipping their own NOTIFYs) with a secret of the gateway's own; a
CancelRequest (often on a new, plain connection without SNI) is looked up here by pid and
secret and forwarded with the backend's own key. Unknown keys are ignored silently, as
Postgres does. Pids are unique among the live processes of one machine; a remote route's
backend pid may equal a local one, which the secret tells apart.

Secrets are 4 random bytes for protocol 3.0 clients and 32 bytes for clients that ask for 3.2
(Postgres 18's length): a version byte, two bytes for the issuing gateway's number (0 until
gateways route cancels to each other), 29 random bytes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol as p

log = logging.getLogger("pgsni.cancel")

LONG_KEY_VERSION = 1
LONG_KEY_RANDOM = 29


@dataclass(frozen=True)
class CancelTarget:
    socket_path: Path | None  # a local instance's socket; None for a remote route
    backend: p.BackendKeyData
    remote: Any = None  # a remote_routes.RemoteRoute: the cancel goes to its host:port


def new_secret(long: bool, gateway: int = 0) -> bytes:
    if not long:
        return secrets.token_bytes(4)
    return bytes([LONG_KEY_VERSION]) + gateway.to_bytes(2, "big") + secrets.token_bytes(LONG_KEY_RANDOM)


class CancelTable:
    def __init__(self) -> None:
        self._targets: dict[int, list[tuple[bytes, CancelTarget]]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._targets.values())

    def issue(self, target: CancelTarget, *, long: bool = False) -> p.BackendKeyData:
        """The key a client is given for `target`: its backend's pid, a secret of ours."""
        key = p.BackendKeyData(target.backend.pid, new_secret(long))
        self._targets.setdefault(key.pid, []).append((key.secret, target))
        return key

    def forget(self, key: p.BackendKeyData) -> None:
        entries = [e for e in self._targets.get(key.pid, []) if e[0] != key.secret]
        if entries:
            self._targets[key.pid] = entries
        else:
            self._targets.pop(key.pid, None)

    def lookup(self, request: p.CancelRequest) -> CancelTarget | None:
        found = None
        for secret, target in self._targets.get(request.pid, []):
            if hmac.compare_digest(secret, request.secret):  # every entry compared: no early exit
                found = target
        return found

    async def cancel(self, request: p.CancelRequest) -> bool:
        target = self.lookup(request)
        if target is None:
            log.debug("cancel request with an unknown key ignored")
            return False
        await forward_cancel(target)
        return True


async def forward_cancel(target: CancelTarget, timeout: float = 5.0) -> None:
    if target.remote is not None:
        from .remote import forward_cancel as forward_remote  # remote imports this module
        await forward_remote(target.remote, target.backend, timeout)
        return
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(target.socket_path)), timeout)
        writer.write(p.CancelRequest(target.backend.pid, target.backend.secret).encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(), timeout)  # the server closes when done
        writer.close()
    except (OSError, asyncio.TimeoutError) as e:
        log.warning("forwarding a cancel request failed: %s", e)
