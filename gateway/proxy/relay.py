"""Log in to an instance over its private unix socket with the client's startup parameters,
collect what the client must see (ParameterStatus, notices), and then pipe both ways."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable

from gateway.errors import CANNOT_CONNECT_NOW, INTERNAL_ERROR, GatewayError
from gateway.wire import protocol as p
from gateway.wire.scram import SCRAM, ScramClient, ScramError, ScramKeys

from .conn import ConnectionClosed, PgConnection, link


# startup parameters that concern the gateway only, never the backend
_GATEWAY_ONLY_PREFIX = "_pq_."


class BackendRefused(Exception):
    """The backend answered the login with an ErrorResponse; pass it on verbatim."""

    def __init__(self, raw: bytes, error: p.ErrorResponse) -> None:
        super().__init__(error.message)
        self.raw = raw
        self.error = error

    @property
    def passing(self) -> bool:
        """Whether the refusal is for now only (57P03: the server is starting up, in crash
        recovery or shutting down), so that a later login may succeed."""
        return self.error.code == CANNOT_CONNECT_NOW


class BackendClosed(GatewayError):
    """The backend closed the connection before the login finished: for one, a postmaster
    going into crash recovery ends the logins in progress without a word. A later login may
    succeed."""

    passing = True


class BackendUnreachable(GatewayError):
    """The instance's socket refused the connection or was gone: its postmaster may be on its
    way out (it removes the socket before it exits)."""


@dataclass
class BackendSession:
    conn: PgConnection
    key: p.BackendKeyData | None
    to_client: list[bytes]  # encoded ParameterStatus / NoticeResponse, in order
    ready: bytes  # the encoded ReadyForQuery


def backend_params(params: dict[str, str], options: str) -> dict[str, str]:
    out = {k: v for k, v in params.items() if k != "options" and not k.startswith(_GATEWAY_ONLY_PREFIX)}
    if options:
        out["options"] = options
    return out


async def login(socket_path: Path, params: dict[str, str], timeout: float,
                keys: "Awaitable[ScramKeys]") -> BackendSession:
    """Log in as the client's role. The instance asks for SCRAM (dbroles.hba) and is answered
    with `keys`, awaited only when it asks: an early login forks the backend while the
    client is still proving its password."""
    conn = await _connect(socket_path, timeout)
    try:
        return await asyncio.wait_for(_login(conn, params, keys), timeout)
    except asyncio.TimeoutError:
        conn.close()
        raise GatewayError(CANNOT_CONNECT_NOW, "the database server did not finish the login in time",
                           hint="Try again; if it persists, ask the operator to check the gateway log.") from None
    except BaseException:
        conn.close()
        raise


async def _connect(socket_path: Path, timeout: float) -> PgConnection:
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(loop.create_unix_connection(
            lambda: PgConnection(p.MessageReader(startup=False)), str(socket_path)), timeout)
        return conn
    except OSError as e:
        gone = isinstance(e, (FileNotFoundError, ConnectionRefusedError))
        raise (BackendUnreachable if gone else GatewayError)(
            INTERNAL_ERROR, "could not reach the database server", detail=str(e)) from e
    except asyncio.TimeoutError as e:
        raise GatewayError(INTERNAL_ERROR, "could not reach the database server",
                           detail="its socket did not accept the connection in time") from e


async def _login(conn: PgConnection, params: dict[str, str], keys: "Awaitable[ScramKeys]") -> BackendSession:
    conn.send(p.StartupMessage(3, 0, params).encode())
    key: p.BackendKeyData | None = None
    to_client: list[bytes] = []
    scram: ScramClient | None = None
    try:
        while True:
            msg = await conn.next_event()
            assert isinstance(msg, p.Message)
            event = p.decode_backend(msg)
            if isinstance(event, p.Authentication):
                scram = await _answer(conn, event, scram, keys)
            elif isinstance(event, p.BackendKeyData):
                key = event
            elif isinstance(event, p.ReadyForQuery):
                return BackendSession(conn, key, to_client, msg.encode())
            elif isinstance(event, p.ErrorResponse) and not event.notice:
                raise BackendRefused(msg.encode(), event)
            else:  # ParameterStatus, NoticeResponse, anything else the client should see
                to_client.append(msg.encode())
    except ConnectionClosed:
        raise BackendClosed(INTERNAL_ERROR, "the database server closed the connection during login") from None


async def _answer(conn: PgConnection, event: p.Authentication, scram: ScramClient | None,
                  keys: "Awaitable[ScramKeys]") -> ScramClient | None:
    """One step of the instance's SCRAM exchange; the exchange so far is returned."""
    try:
        if event.code == p.AUTH_OK:
            return scram
        if event.code == p.AUTH_SASL and SCRAM in p.sasl_mechanisms(event):
            scram = ScramClient(await keys)
            conn.send(p.SASLInitialResponse(SCRAM, scram.first()).encode())
            return scram
        if event.code == p.AUTH_SASL_CONTINUE and scram is not None:
            conn.send(p.Message(b"p", scram.final(event.data)).encode())
            return scram
        if event.code == p.AUTH_SASL_FINAL and scram is not None:
            scram.verify(event.data)
            return scram
    except ScramError as e:
        raise GatewayError(INTERNAL_ERROR, "the database server's SCRAM exchange failed", detail=str(e)) from None
    raise GatewayError(INTERNAL_ERROR, "the database server asked the gateway for another kind of "
                       f"authentication (code {event.code}); its pg_hba.conf is not the gateway's")


async def pipe(client: PgConnection, backend: PgConnection) -> None:
    """Forward raw bytes both ways until either side closes. The other side is then closed
    (after flushing); the session does not wait for an idle TLS client to answer the close."""
    link(client, backend)
    await asyncio.wait([client.closed, backend.closed], return_when=asyncio.FIRST_COMPLETED)
