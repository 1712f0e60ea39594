"""The front door: listen, recognise each client's opening (gateway/wire/opening.py), set up
TLS, and hand the connection to a Session."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from certs.context import server_name
from gateway.wire import opening
from gateway.wire import protocol as p
from gateway.wire.opening import Opening

from .conn import TLS_SHUTDOWN_TIMEOUT, PgConnection
from .context import ClientInfo, ProxyContext
from .session import Session

log = logging.getLogger("pgsni.server")


class Listener:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

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
        try:
            sock.bind((s.listen_host, s.listen_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {s.listen_host}:{s.listen_port}: {e.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop())

    async def close(self) -> None:
        """Stop accepting; sessions already accepted go on."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

    # --- accepting ---------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                sock, addr = await loop.sock_accept(self._sock)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.error("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handle(sock, addr))
            self.ctx.sessions.add(task)
            task.add_done_callback(self.ctx.sessions.discard)

    async def _handle(self, sock: socket.socket, addr) -> None:
        # caps are checked at accept; a refused client still gets TLS and a readable
        # ErrorResponse (after its startup message), and is not counted
        ip = addr[0] if isinstance(addr, tuple) else str(addr)
        limits = self.ctx.limits
        refusal = limits.admit(ip)
        try:
            await self._handle_client(sock, addr, refusal)
        finally:
            if refusal is None:
                limits.leave(ip)

    async def _handle_client(self, sock: socket.socket, addr, refusal) -> None:
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn, info = await asyncio.wait_for(self._open(sock, peer), self.ctx.settings.handshake_timeout)
        except (asyncio.TimeoutError, OSError, ssl.SSLError, ConnectionError, p.ProtocolViolation) as e:
            log.debug("connection from %s dropped during opening: %s", peer, e)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        if conn is None:
            sock.close()
            return
        await Session(self.ctx, conn, info, refusal).run()

    async def _open(self, sock: socket.socket, peer: str) -> tuple[PgConnection | None, ClientInfo]:
        """Read the opening bytes ourselves, so that nothing past them is consumed before TLS."""
        loop = asyncio.get_running_loop()
        while True:
            first = await _peek(loop, sock)
            if not first:
                return None, ClientInfo(peer, False)
            if opening.is_direct_tls(first):
                return await self._start_tls(sock, peer, direct=True)
            head = await _recv_exactly(loop, sock, opening.HEAD)
            if len(head) < opening.HEAD:
                return None, ClientInfo(peer, False)
            kind = opening.classify(head)
            if kind is Opening.SSL_REQUEST:
                await loop.sock_sendall(sock, b"S")
                return await self._start_tls(sock, peer, direct=False)
            if kind is Opening.GSSENC_REQUEST:
                await loop.sock_sendall(sock, b"N")  # no GSSAPI; the client carries on
                continue
            # a plain StartupMessage or CancelRequest: the reader takes it from here
            conn = self._new_connection(prefix=head)
            await loop.connect_accepted_socket(lambda: conn, sock)
            return conn, ClientInfo(peer, False)

    def _new_connection(self, prefix: bytes = b"") -> PgConnection:
        reader = p.MessageReader(startup=True, max_length=self.ctx.settings.max_message_size)
        return PgConnection(reader, prefix=prefix)

    async def _start_tls(self, sock: socket.socket, peer: str, direct: bool) -> tuple[PgConnection, ClientInfo]:
        loop = asyncio.get_running_loop()
        conn = self._new_connection()
        cert_pem = self.ctx.cert_pem  # the certificate this handshake presents, for channel binding
        # with ssl=, the returned protocol is the loop's TLS wrapper, so keep our own reference
        transport, _ = await loop.connect_accepted_socket(
            lambda: conn, sock, ssl=self.ctx.ssl_context,
            ssl_handshake_timeout=self.ctx.settings.handshake_timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj else None
        log.debug("TLS from %s: direct=%s sni=%s alpn=%s", peer, direct, server_name(sslobj), alpn)
        cipher = sslobj.cipher() if sslobj else None
        return conn, ClientInfo(peer, True, server_name(sslobj), cert_pem,
                                sslobj.version() if sslobj else None, cipher[0] if cipher else None)


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    await _readable(loop, sock)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return await _peek(loop, sock)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)
