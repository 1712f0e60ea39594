"""Sessions on remote routes: reach the external Postgres (TCP, then SSLRequest and TLS as its
sslmode says), log the client in there, relay, and forward cancel requests to it."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import socket
import ssl
import time
import weakref

from scramp import ScramClient, ScramException

from gateway import errors
from gateway.errors import FEATURE_NOT_SUPPORTED, PROTOCOL_VIOLATION, GatewayError
from gateway.metrics import auth_reason
from gateway.remote_routes import RemoteRoute
from gateway.wire import protocol as p
from gateway.wire.scram import SCRAM, SCRAM_PLUS

from . import relay
from .cancel import CancelTarget
from .context import ProxyContext, SessionView
from .sockets import connect_tcp
from .conn import TLS_SHUTDOWN_TIMEOUT, ConnectionClosed, PgConnection


log = logging.getLogger("pgsni.remote")

UNREACHABLE = "08001"  # sqlclient_unable_to_establish_sqlconnection
# requests that the client (passthrough) or the gateway (password) answers with one 'p' message
_ANSWERED = (p.AUTH_CLEARTEXT, p.AUTH_MD5, p.AUTH_SASL, p.AUTH_SASL_CONTINUE)
# relayed remote connections per gateway, closed by close_all() at the end of a shutdown grace
_relayed: "weakref.WeakKeyDictionary[ProxyContext, set[RemoteConnection]]" = weakref.WeakKeyDictionary()
# the whole of a ReadyForQuery but its status byte
_READY = p.Message(b"Z", b"I").encode()[:-1]


class RemoteConnection(PgConnection):
    """The remote side of a session. Its stream to the client is relayed unparsed, so the
    gateway cannot tell where one message ends in general; but when the last bytes the remote
    sent were a whole ReadyForQuery, the client has been answered and is waiting, and a
    message of the gateway's own can follow (`at_rest`)."""

    at_rest = False

    def data_received(self, data: bytes) -> None:
        self.at_rest = data[-6:-1] == _READY and data[-1:] in b"ITE"
        super().data_received(data)


def unreachable(db_id: str, reason: str) -> GatewayError:
    return GatewayError(UNREACHABLE, f'could not connect to the server of database "{db_id}" '
                        "(a remote route)", detail=reason,
                        hint="Try again; if it persists, ask the operator to check the remote "
                             "server and the gateway log.")


# --- SASL mechanism lists -------------------------------------------------------------------


def sasl_mechanisms(data: bytes) -> list[str]:
    """The mechanism names of an AuthenticationSASL body (NUL-terminated strings, then a NUL)."""
    if not data.endswith(b"\0"):
        raise p.ProtocolViolation("AuthenticationSASL mechanism list is not terminated")
    names = data[:-1].split(b"\0")
    if names[-1:] == [b""]:
        names.pop()
    try:
        return [n.decode("utf-8") for n in names if n]
    except UnicodeDecodeError:
        raise p.ProtocolViolation("AuthenticationSASL mechanism name is not valid UTF-8") from None


def without_channel_binding(request: p.Authentication) -> p.Authentication:
    """The remote's AuthenticationSASL minus the -PLUS mechanisms. The client's channel binding
    would be to the gateway's certificate, which the remote cannot check."""
    kept = [m for m in sasl_mechanisms(request.data) if not m.endswith("-PLUS")]
    if not kept:
        raise GatewayError(FEATURE_NOT_SUPPORTED,
                           "the remote server only offers SASL with channel binding, which cannot "
                           "be relayed through the gateway",
                           hint='Ask the operator to set auth = "password" for this remote route.')
    return p.auth_sasl(kept)


# --- connecting -------------------------------------------------------------------------------


async def connect(route: RemoteRoute, timeout: float, db_id: str) -> PgConnection:
    """A connection to the remote server that reads typed messages, encrypted as sslmode says."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            sock = await connect_tcp(route.host, route.port)
            try:
                return await _open(loop, sock, route, timeout)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        reason = logged = f"no answer within {timeout:g}s"
    except ssl.SSLCertVerificationError as e:
        reason = logged = f"the remote server's certificate was refused: {e.verify_message}"
    except ssl.SSLError as e:
        reason = logged = f"TLS with the remote server failed: {e.reason or e}"
    except socket.gaierror as e:
        reason, logged = "the remote server's host name could not be resolved", str(e)
    except OSError as e:
        # the client gets the kind of failure; addresses and the like stay in the log
        reason = os.strerror(e.errno).lower() if e.errno else (e.strerror or "network error")
        logged = str(e) or type(e).__name__
    log.warning("remote route %s (%s, sslmode=%s) unreachable: %s", db_id, route.address,
                route.sslmode, logged)
    raise unreachable(db_id, reason)


async def _open(loop: asyncio.AbstractEventLoop, sock: socket.socket, route: RemoteRoute,
                timeout: float) -> PgConnection:
    ctx = route.ssl_context()
    conn = RemoteConnection(p.MessageReader(startup=False))
    if ctx is None:
        await loop.create_connection(lambda: conn, sock=sock)
        return conn
    await loop.sock_sendall(sock, p.SSLRequest().encode())
    answer = await loop.sock_recv(sock, 1)  # exactly one byte: nothing may ride ahead of TLS
    if answer != b"S":
        raise OSError("the remote server does not accept TLS" if answer == b"N"
                      else "the remote server did not answer the SSLRequest")
    await loop.create_connection(lambda: conn, sock=sock, ssl=ctx, server_hostname=route.tls_name,
                                 ssl_handshake_timeout=timeout,
                                 ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
    return conn


# --- logging in ------------------------------------------------------------------------------


async def open_session(session: SessionView, db_id: str, params: dict[str, str]) -> relay.BackendSession:
    """Log the session's client in on the remote route of `db_id`; the remote checks the
    password. Its refusal (28P01 and the like) reaches the client verbatim."""
    gw = session.gw
    route: RemoteRoute = gw.settings.remote_routes[db_id]
    session.log.route = "remote"
    if gw.shutting_down:
        raise errors.shutting_down()
    if route.auth == "password" and not session.client.tls:
        raise errors.tls_required()  # the password would cross the network in the clear
    started = time.monotonic()
    try:
        backend = await login(session.conn, db_id, route, params, gw.settings.remote_connect_timeout)
    except relay.BackendRefused as e:
        if e.error.code.startswith("28"):  # wrong password, unknown role, no login
            gw.limits.auth_failed(session.client.peer.rpartition(":")[0], db_id)
            session.auth_failed(auth_reason(e.error.code, e.error.message) or "other")
        raise
    session.log.wake_ms = (time.monotonic() - started) * 1000
    session.log.auth = "ok"
    session.meter_auth(db_id)
    return backend


async def login(client: PgConnection, db_id: str, route: RemoteRoute, params: dict[str, str],
                timeout: float) -> relay.BackendSession:
    password = await _ask_password(client) if route.auth == "password" else None
    remote = await connect(route, timeout, db_id)
    try:
        remote.send(p.StartupMessage(3, 0, params).encode())
        await _authenticate(client, remote, db_id, params["user"], password, timeout)
        client.send(p.Authentication(p.AUTH_OK).encode())
        return await _until_ready(remote, db_id, timeout)
    except BaseException:
        remote.close()
        raise


async def _ask_password(client: PgConnection) -> str:
    client.send(p.Authentication(p.AUTH_CLEARTEXT).encode())
    msg = await client.next_event()
    if not isinstance(msg, p.Message) or msg.type != b"p" or not msg.body.endswith(b"\0"):
        raise p.ProtocolViolation("expected a password message")
    try:
        return msg.body[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise p.ProtocolViolation("password is not valid UTF-8") from None


async def _from_remote(remote: PgConnection, db_id: str,
                       timeout: float) -> tuple[p.Message, p.BackendEvent]:
    """The remote's next message during login; it gets `timeout` seconds for each (the
    client's own turns in a passthrough exchange are not counted)."""
    try:
        msg = await asyncio.wait_for(remote.next_event(), timeout)
    except ConnectionClosed:
        raise unreachable(db_id, "the remote server closed the connection during login") from None
    except asyncio.TimeoutError:
        raise unreachable(db_id, f"the remote server did not answer during login within {timeout:g}s "
                                 "(remote_connect_timeout)") from None
    assert isinstance(msg, p.Message)
    event = p.decode_backend(msg)
    if isinstance(event, p.ErrorResponse) and not event.notice:
        raise relay.BackendRefused(msg.encode(), event)
    return msg, event


async def _authenticate(client: PgConnection, remote: PgConnection, db_id: str, user: str,
                        password: str | None, timeout: float) -> None:
    scram: ScramClient | None = None
    while True:
        msg, event = await _from_remote(remote, db_id, timeout)
        if isinstance(event, p.NegotiateProtocolVersion):
            continue  # we asked for 3.0 without _pq_ options; nothing to adjust
        if not isinstance(event, p.Authentication):
            if isinstance(event, p.ErrorResponse):  # a notice
                client.send(msg.encode())
                continue
            raise unreachable(db_id, f"the remote server sent message {msg.type!r} before "
                                     "authentication finished")
        if event.code == p.AUTH_OK:
            return
        if event.code not in _ANSWERED + (p.AUTH_SASL_FINAL,):
            raise GatewayError(FEATURE_NOT_SUPPORTED, "the remote server asks for an "
                               f"authentication method the gateway cannot relay (code {event.code})",
                               hint="Use SCRAM-SHA-256, md5 or password authentication on the remote.")
        if password is None:
            await _relay_step(client, remote, event)
        else:
            scram = _answer(remote, event, user, password, scram)


async def _relay_step(client: PgConnection, remote: PgConnection, event: p.Authentication) -> None:
    """passthrough: hand one authentication request to the client and its answer back."""
    if event.code == p.AUTH_SASL:
        event = without_channel_binding(event)
    client.send(event.encode())
    if event.code not in _ANSWERED:
        return
    reply = await client.next_event()
    if not isinstance(reply, p.Message) or reply.type != b"p":
        raise p.ProtocolViolation("expected a password or SASL response")
    remote.send(reply.encode())


def _answer(remote: PgConnection, event: p.Authentication, user: str, password: str,
            scram: ScramClient | None) -> ScramClient | None:
    """password: answer one authentication request with the client's password."""
    try:
        if event.code == p.AUTH_CLEARTEXT:
            remote.send(_password_message(password))
        elif event.code == p.AUTH_MD5:
            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + event.data[:4]).hexdigest()
            remote.send(_password_message("md5" + outer))
        elif event.code == p.AUTH_SASL:
            offered = [m for m in sasl_mechanisms(event.data) if m in (SCRAM, SCRAM_PLUS)]
            if not offered:
                raise GatewayError(FEATURE_NOT_SUPPORTED, "the remote server offers no SCRAM-SHA-256")
            sslobj = remote.transport.get_extra_info("ssl_object") if remote.transport else None
            # bind to the remote's own certificate when it offers -PLUS
            binding = ("tls-server-end-point", sslobj) if sslobj is not None and SCRAM_PLUS in offered else None
            scram = ScramClient(offered, user, password, channel_binding=binding)
            log.debug("logging in to the remote with %s", scram.mechanism_name)
            first = scram.get_client_first().encode()
            remote.send(p.SASLInitialResponse(scram.mechanism_name, first).encode())
        elif event.code == p.AUTH_SASL_CONTINUE and scram is not None:
            scram.set_server_first(event.data.decode("utf-8"))
            remote.send(p.Message(b"p", scram.get_client_final().encode()).encode())
        elif event.code == p.AUTH_SASL_FINAL and scram is not None:
            scram.set_server_final(event.data.decode("utf-8"))  # the remote proves it too
        else:
            raise p.ProtocolViolation(f"remote sent authentication code {event.code} out of order")
    except (ScramException, UnicodeDecodeError) as e:
        raise GatewayError(PROTOCOL_VIOLATION, f"SCRAM with the remote server failed: {e}") from None
    return scram


def _password_message(text: str) -> bytes:
    return p.Message(b"p", text.encode("utf-8") + b"\0").encode()


async def _until_ready(remote: PgConnection, db_id: str, timeout: float) -> relay.BackendSession:
    key: p.BackendKeyData | None = None
    to_client: list[bytes] = []
    while True:
        msg, event = await _from_remote(remote, db_id, timeout)
        if isinstance(event, p.BackendKeyData):
            key = event
        elif isinstance(event, p.ReadyForQuery):
            return relay.BackendSession(remote, key, to_client, msg.encode())
        else:  # ParameterStatus, NoticeResponse
            to_client.append(msg.encode())


# --- relaying and cancelling -----------------------------------------------------------------


async def serve(session: SessionView, db_id: str, backend: relay.BackendSession) -> None:
    """Give the client our own cancel key for the remote's, then pipe both ways."""
    gw = session.gw
    route = gw.settings.remote_routes[db_id]
    key = gw.cancels.issue(CancelTarget(backend.key, functools.partial(forward_cancel, route)),
                           long=session.protocol_minor >= 2) if backend.key else None
    relayed = _relayed.setdefault(gw, set())
    relayed.add(backend.conn)
    try:
        session.conn.send(b"".join(backend.to_client) + (key.encode() if key else b"") + backend.ready)
        session.log.outcome = "relayed"
        await relay.pipe(session.conn, backend.conn)
    finally:
        relayed.discard(backend.conn)
        if key is not None:
            gw.cancels.forget(key)
        backend.conn.close()


def close_all(gw: ProxyContext) -> int:
    """Shutdown, after the grace period: close every relayed remote connection (its client
    is closed after its pending bytes are flushed). A client waiting for its next query is
    told why first (57P01, as Postgres tells its own clients at a fast shutdown); one in the
    middle of a reply is only closed, since a message cannot be put inside another. Returns
    how many there were."""
    relayed = _relayed.pop(gw, set())
    for conn in relayed:
        if conn.at_rest and conn.peer is not None:
            conn.peer.send(errors.shutting_down().response().encode())
            conn.close()
        else:  # its reply is cut anyway; a TLS close could wait on its paused reading
            conn.abort()
    return len(relayed)


async def forward_cancel(route: RemoteRoute, key: p.BackendKeyData, timeout: float) -> None:
    """Send the remote's own key to its host:port, over TLS unless its sslmode is disable."""
    try:
        conn = await connect(route, timeout, "(cancel request)")
    except GatewayError:
        return  # logged by connect
    try:
        conn.send(p.CancelRequest(key.pid, key.secret).encode())
        await asyncio.wait_for(asyncio.shield(conn.closed), timeout)  # it closes when done
    except asyncio.TimeoutError:
        log.warning("cancel request to remote %s: no answer within %gs", route.address, timeout)
    finally:
        conn.close()
