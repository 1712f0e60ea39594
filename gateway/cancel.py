"""Cancel keys are the gateway's own. Each session gets a random BackendKeyData; a
CancelRequest (often on a new, plain connection without SNI) is looked up here and forwarded
to the backend it stands for. Unknown keys are ignored silently, as Postgres does."""

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


@dataclass(frozen=True)
class CancelTarget:
    socket_path: Path | None  # a local instance's socket; None for a remote route
    backend: p.BackendKeyData
    remote: Any = None  # a remote_routes.RemoteRoute: the cancel goes to its host:port


class CancelTable:
    def __init__(self) -> None:
        self._targets: dict[int, tuple[bytes, CancelTarget]] = {}

    def __len__(self) -> int:
        return len(self._targets)

    def issue(self, target: CancelTarget) -> p.BackendKeyData:
        while True:
            pid = secrets.randbelow(2**31 - 2) + 1
            if pid not in self._targets:
                break
        secret = secrets.token_bytes(4)
        self._targets[pid] = (secret, target)
        return p.BackendKeyData(pid, secret)

    def forget(self, key: p.BackendKeyData) -> None:
        self._targets.pop(key.pid, None)

    def lookup(self, request: p.CancelRequest) -> CancelTarget | None:
        entry = self._targets.get(request.pid)
        if entry is None or not hmac.compare_digest(entry[0], request.secret):
            return None
        return entry[1]

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
