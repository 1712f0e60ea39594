"""Cancel keys. A client is told its real backend's pid (libraries use it: pg_terminate_backend,
pg_stat_activity, skipping their own NOTIFYs) with a secret of the gateway's own; a
CancelRequest (often on a new, plain connection without SNI) is looked up here by pid and
secret and forwarded with the backend's own key. A key not issued here goes to the other
gateways of the fleet (`elsewhere`, gateway/proxy/cancel_fleet.py), which look it up in their
own tables only. Unknown keys are ignored silently, as Postgres does. Pids are unique among the
live processes of one machine; a remote route's backend pid may equal a local one, and
another gateway's backends may have any pid: the secret tells them apart.

Secrets are 4 random bytes for protocol 3.0 clients and 32 bytes for clients that ask for 3.2
(Postgres 18's length): a version byte, two bytes for the issuing gateway's number (0 without
links between gateways), 29 random bytes."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from gateway.wire import protocol as p

log = logging.getLogger("pgsni.cancel")

LONG_KEY_VERSION = 1
LONG_KEY_RANDOM = 29
FORWARD_TIMEOUT = 5.0


Forward = Callable[[p.BackendKeyData, float], Awaitable[None]]


@dataclass(frozen=True)
class CancelTarget:
    backend: p.BackendKeyData  # the backend's own key
    forward: Forward  # sends that key where the backend is (with a timeout)

    @classmethod
    def local(cls, socket_path: Path, backend: p.BackendKeyData) -> "CancelTarget":
        """A backend of a local instance, reached over its unix socket."""
        return cls(backend, functools.partial(cancel_over_socket, socket_path))


def new_secret(long: bool, gateway: int = 0) -> bytes:
    if not long:
        return secrets.token_bytes(4)
    return bytes([LONG_KEY_VERSION]) + gateway.to_bytes(2, "big") + secrets.token_bytes(LONG_KEY_RANDOM)


def gateway_of(secret: bytes) -> int:
    """The number of the gateway that issued a long secret (0: not known)."""
    return int.from_bytes(secret[1:3], "big") if len(secret) == 32 and secret[0] == LONG_KEY_VERSION else 0


class CancelTable:
    def __init__(self) -> None:
        self._targets: dict[int, list[tuple[bytes, CancelTarget]]] = {}
        self.gateway = 0  # this gateway's number, written into long secrets
        # where keys not issued here are sent (the other gateways); None: nowhere
        self.elsewhere: Callable[[p.CancelRequest], Awaitable[str]] | None = None

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._targets.values())

    def issue(self, target: CancelTarget, *, long: bool = False) -> p.BackendKeyData:
        """The key a client is given for `target`: its backend's pid, a secret of ours."""
        key = p.BackendKeyData(target.backend.pid, new_secret(long, self.gateway))
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

    async def cancel(self, request: p.CancelRequest) -> str:
        """A client's CancelRequest: sent to its backend if the key is ours ("forwarded"),
        else to the other gateways (what `elsewhere` says: "relayed", "dropped"), else "unknown"."""
        if await self.cancel_here(request):
            return "forwarded"
        if self.elsewhere is None:
            log.debug("cancel request with an unknown key ignored")
            return "unknown"
        return await self.elsewhere(request)

    async def cancel_here(self, request: p.CancelRequest) -> bool:
        """Only this gateway's keys: a request another gateway relayed never goes further."""
        target = self.lookup(request)
        if target is None:
            return False
        await target.forward(target.backend, FORWARD_TIMEOUT)
        return True


async def cancel_over_socket(socket_path: Path, key: p.BackendKeyData, timeout: float) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket_path)), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        log.warning("forwarding a cancel request failed: %s", e)
        return
    try:
        writer.write(p.CancelRequest(key.pid, key.secret).encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(), timeout)  # the server closes when done
    except (OSError, asyncio.TimeoutError) as e:
        log.warning("forwarding a cancel request failed: %s", e)
    finally:
        writer.close()
