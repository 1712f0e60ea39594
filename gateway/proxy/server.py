"""The front door: listen, recognise each client's opening (gateway/wire/opening.py), set up
TLS, and hand the connection to a Session; or, with a fleet, hand a client whose database
another gateway holds to that gateway before its TLS begins (forward.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

from certs.context import server_name
from gateway.errors import GatewayError
from gateway.wire import opening
from gateway.wire import protocol as p
from gateway.wire.link import HandedSession
from gateway.wire.opening import Opening

from .conn import TLS_SHUTDOWN_TIMEOUT, PgConnection
from .context import ClientInfo, ProxyContext
from .forward import HandedOver
from .limits import REFUSING_SECONDS
from .peek import peek_first, peek_hello
from .session import Session
from .sockets import accept_forever

log = logging.getLogger("pgsni.server")


@dataclass(frozen=True)
class _Handover:
    """A client handed to the gateway that holds its database: what is left to run here
    (forward.Forwarding.hand_over)."""

    rest: HandedOver


class Listener:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self.reuse_port = False  # SO_REUSEPORT, for the workers of gateway/workers.py

    @property
    def port(self) -> int:
        assert self._sock is not None
        return self._sock.getsockname()[1]

    @property
    def listening(self) -> bool:
        """The accept loop runs (for readiness)."""
        return self._sock is not None and self._task is not None and not self._task.done()

    def open(self) -> None:
        s = self.ctx.settings
        family = socket.AF_INET6 if ":" in s.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:  # workers of one machine share the port; the kernel spreads clients
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((s.listen_host, s.listen_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {s.listen_host}:{s.listen_port}: {e.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(accept_forever(
            sock, lambda client, peer: self._track(self._handle(client, peer)), "a client"))

    async def close(self) -> None:
        """Stop accepting; sessions already accepted go on."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

    # --- accepting ---------------------------------------------------------------------------
    async def _handle(self, sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self._admitted(peer, lambda refusal: self._handle_client(sock, peer, refusal, None), sock.close)

    async def serve_forwarded(self, sock: socket.socket, peer: str, direct: bool) -> None:
        """A client another gateway handed over before its TLS began, on a bare link
        (forward.py) or as its own socket, passed by another worker of this machine
        (local_links.py): served as if it had come here, and never handed over again.
        Returns when its session ended."""
        self.ctx.metrics.forwarded("in")
        with self._a_session():
            await self._admitted(peer, lambda refusal: self._handle_client(sock, peer, refusal, direct),
                                 sock.close)

    async def serve_session(self, link: asyncio.Transport | socket.socket, handed: HandedSession) -> None:
        """A session another gateway handed over after its TLS ended there (the client named
        its database in the startup message only, forward.py): its startup message comes
        next on the link (or on the socket pair another worker passed). Served as if it had
        come here with that TLS, never forwarded again."""
        self.ctx.metrics.forwarded("in")
        conn = self._new_connection()
        if isinstance(link, socket.socket):  # another worker's socket pair
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, link)
        else:
            link.set_protocol(conn)
            conn.connection_made(link)
            link.resume_reading()
        info = ClientInfo(handed.peer, True, None, handed.cert_pem or None, handed.tls_version or None,
                          handed.cipher or None, handed=True)
        with self._a_session():
            await self._admitted(handed.peer, lambda refusal: Session(self.ctx, conn, info, refusal).run(),
                                 link.close)

    def take_passed(self, sock: socket.socket, peer: str, direct: bool) -> None:
        """A client another worker of this machine passed (local_links.py): `serve_forwarded`
        in a task of its own."""
        self._track(self.serve_forwarded(sock, peer, direct))

    @contextlib.contextmanager
    def _a_session(self):
        """The running task (a link's or a passed socket's) counts as a client session while
        in the block: the shutdown grace waits for it, and clients_open counts it."""
        task = asyncio.current_task()
        assert task is not None
        self.ctx.sessions.add(task)
        try:
            yield
        finally:
            self.ctx.sessions.discard(task)

    def _track(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.ctx.sessions.add(task)
        task.add_done_callback(self.ctx.sessions.discard)

    async def _admitted(self, peer: str, serve: Callable[[GatewayError | None], Awaitable[None]],
                        close: Callable[[], object]) -> None:
        """`serve(refusal)` the client from `peer`, counted against the connection caps;
        `close()` ends its connection."""
        # caps are checked at accept; a refused client still gets TLS and a readable
        # ErrorResponse (after its startup message), within REFUSING_SECONDS, and is not
        # counted; beyond REFUSING_* refused clients at once, one is closed without a word
        ip = peer.rpartition(":")[0].strip("[]") or peer
        limits = self.ctx.limits
        refusal = limits.admit(ip)
        if refusal is None:
            try:
                await serve(None)
            finally:
                limits.leave(ip)
            return
        if not limits.refusing(ip):
            close()
            return
        try:
            async with asyncio.timeout(min(REFUSING_SECONDS, self.ctx.settings.handshake_timeout)):
                await serve(refusal)
        except TimeoutError:
            close()
        finally:
            limits.refused(ip)

    async def _handle_client(self, sock: socket.socket, peer: str, refusal, direct: bool | None) -> None:
        """`direct`: None for a client that came here on `sock` (its opening is read here),
        else how a handed-over client opened TLS (it begins on `sock` now)."""
        try:
            # a refused client is told so here (53300 after its startup message): never handed
            # over, uncounted, to a holder elsewhere
            opened = await asyncio.wait_for(self._open(sock, peer, refusal is None) if direct is None
                                            else self._start_tls(sock, peer, direct, handed=True),
                                            self.ctx.settings.handshake_timeout)
        except (asyncio.TimeoutError, OSError, ssl.SSLError, ConnectionError, p.ProtocolViolation) as e:
            log.debug("connection from %s dropped during opening: %r", peer, e)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        if isinstance(opened, _Handover):
            self.ctx.metrics.forwarded("out")
            await opened.rest
            return
        conn, info = opened
        if conn is None:
            sock.close()
            return
        await Session(self.ctx, conn, info, refusal).run()

    async def _open(self, sock: socket.socket, peer: str,
                    may_hand_over: bool) -> "tuple[PgConnection | None, ClientInfo] | _Handover":
        """Read the opening bytes ourselves, so that nothing past them is consumed before TLS.
        `may_hand_over`: the client is within this gateway's connection caps."""
        loop = asyncio.get_running_loop()
        declined_gss = False
        while True:
            first = await peek_first(sock)
            if not first:
                return None, ClientInfo(peer, False)
            if opening.is_direct_tls(first):
                return (may_hand_over and await self._handover(sock, peer, True)
                        or await self._start_tls(sock, peer, direct=True))
            head = await _recv_exactly(loop, sock, opening.HEAD)
            if len(head) < opening.HEAD:
                return None, ClientInfo(peer, False)
            kind = opening.classify(head)
            if kind is Opening.SSL_REQUEST:
                await loop.sock_sendall(sock, b"S")
                return (may_hand_over and await self._handover(sock, peer, False)
                        or await self._start_tls(sock, peer, direct=False))
            if kind is Opening.GSSENC_REQUEST and not declined_gss:
                await loop.sock_sendall(sock, b"N")  # no GSSAPI; the client carries on
                declined_gss = True  # once, as Postgres: a second one is refused below
                continue
            # a plain StartupMessage or CancelRequest (or a second GSSENCRequest, refused
            # there): the reader takes it from here
            conn = self._new_connection(prefix=head)
            await loop.connect_accepted_socket(lambda: conn, sock)
            return conn, ClientInfo(peer, False)

    async def _handover(self, sock: socket.socket, peer: str, direct: bool) -> "_Handover | None":
        """With a fleet: a link to the gateway that holds the database the ClientHello names,
        which has taken the client; None to serve it here."""
        forwarding = self.ctx.forwarding
        if forwarding is None:
            return None
        hello = await peek_hello(sock, self.ctx.settings.handshake_timeout)
        if hello is None:
            return None  # TLS here says what is wrong with it
        rest = await forwarding.link_for(
            f"client {peer} for {hello.server_name}",
            lambda fresh: forwarding.holder_elsewhere(hello.server_name, fresh),
            lambda address: forwarding.hand_over(sock, address, peer, direct, hello.digest))
        return None if rest is None else _Handover(rest)

    def _new_connection(self, prefix: bytes = b"") -> PgConnection:
        reader = p.MessageReader(startup=True, max_length=self.ctx.settings.max_message_size)
        return PgConnection(reader, prefix=prefix)

    async def _start_tls(self, sock: socket.socket, peer: str, direct: bool, *,
                         handed: bool = False) -> tuple[PgConnection, ClientInfo]:
        """TLS on `sock`; `handed`: the client was handed here by another gateway before it."""
        loop = asyncio.get_running_loop()
        conn = self._new_connection()
        cert_pem = self.ctx.cert_pem  # the certificate this handshake presents, for channel binding
        # with ssl=, the returned protocol is the loop's TLS wrapper, so keep our own reference
        transport, _ = await loop.connect_accepted_socket(
            lambda: conn, sock, ssl=self.ctx.ssl_context,
            ssl_handshake_timeout=self.ctx.settings.handshake_timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        return conn, _tls_client(transport, peer, direct, cert_pem, handed)


def _tls_client(transport: asyncio.BaseTransport, peer: str, direct: bool, cert_pem: str | None,
                handed: bool) -> ClientInfo:
    sslobj = transport.get_extra_info("ssl_object")
    alpn = sslobj.selected_alpn_protocol() if sslobj else None
    log.debug("TLS from %s: direct=%s sni=%s alpn=%s", peer, direct, server_name(sslobj), alpn)
    cipher = sslobj.cipher() if sslobj else None
    return ClientInfo(peer, True, server_name(sslobj), cert_pem,
                      sslobj.version() if sslobj else None, cipher[0] if cipher else None, handed)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            break
        data += chunk
    return data
