"""The front door: listen, recognise each client's opening (SSLRequest, direct TLS,
GSSENCRequest, CancelRequest, plain startup), set up TLS, and hand the connection to a
Session. Also owns start-up and graceful shutdown of the whole gateway."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time

from certs.context import leaf_certificate_pem, server_context, server_name
from certs.reload import TLSMaterial
from storage.cache import Databases
from storage.factory import attach_storage, open_backend, snapshot_store
from storage.local import LocalCatalog
from storage.roles import Role

from . import auth, remote
from . import protocol as p
from .cancel import CancelTable
from .config import Settings
from .instances import InstanceManager
from .limits import Limits
from .metrics import MeteredBackend, Metrics
from .session import ClientInfo, Session
from .template import local_catalog
from .wire import TLS_SHUTDOWN_TIMEOUT, PgConnection

log = logging.getLogger("pgsni.server")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # with tls_from_storage, self.tls sets these in start(), before listening
        self.ssl_context: ssl.SSLContext | None = None
        self.cert_pem: str | None = None
        if not settings.tls_from_storage:
            self.ssl_context = server_context(settings.tls_cert, settings.tls_key)
            self.cert_pem = leaf_certificate_pem(settings.tls_cert)
        self.catalog = local_catalog(settings)
        self.metrics = Metrics()
        self.backend = MeteredBackend(open_backend(settings), self.metrics)
        self.tls = TLSMaterial.for_settings(settings, self.backend, self._use_tls) \
            if settings.tls_from_storage else None
        self.databases = open_databases(settings, self.catalog, self.backend)
        self.instances = InstanceManager(settings, self.databases)
        self.instances.metrics = self.metrics
        self.instances.after_create = self._refill_spares
        self._spare_task: asyncio.Future | None = None
        self.databases.store.on_transfer = self.metrics.snapshot
        self.cancels = CancelTable()
        self.limits = Limits(settings)
        self.dev_role = Role("postgres", auth.scram_verifier(settings.dev_password), superuser=False) \
            if settings.create_on_connect else None
        self.shutting_down = False
        self.sessions: set[asyncio.Task] = set()
        self.early_logins: dict[str, int] = {}  # backend logins running ahead of auth, per db
        self.early_logins_started = 0  # (tests)
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._detach_storage = None  # storage=s3fs: the unmount, from start()
        self.admin = None  # gateway/admin.py's AdminServer, from start() unless admin_port=0
        self.metrics.track(self.metrics.instances_running, lambda: len(self.instances.instances))
        self.metrics.track(self.metrics.clients_open, lambda: len(self.sessions))

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.getsockname()[1]

    @property
    def listening(self) -> bool:
        """The accept loop runs (for readiness)."""
        return self._listener is not None and bool(self._tasks) and not self._tasks[0].done()

    async def start(self) -> None:
        # storage=s3fs: mount the bucket (or check the existing mount) before storage is read
        self._detach_storage = await asyncio.to_thread(attach_storage, self.settings)
        try:
            from .admin import start_admin

            self.admin = await start_admin(self)  # first: /healthz answers during a long start
            await self._start()
        except BaseException:
            await self._close_admin()
            await self._detach()
            raise

    async def _close_admin(self) -> None:
        admin, self.admin = self.admin, None
        if admin is not None:
            await admin.close()

    async def _detach(self) -> None:
        detach, self._detach_storage = self._detach_storage, None
        if detach is not None:
            await asyncio.to_thread(detach)

    async def _start(self) -> None:
        s = self.settings
        self.catalog.prepare()
        if self.tls is not None:  # TLSConfigError if storage has no usable pair
            await self.tls.load()
        await self.instances.stop_orphans()  # first: nothing may save a copy a postmaster runs on
        self.databases.recover()
        await asyncio.to_thread(self.catalog.template)  # made once; later creates only clone it
        await asyncio.to_thread(self.catalog.drop_spares)  # may be half-made or from an older template
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
        self._listener = sock
        self._tasks = [asyncio.create_task(self._accept_loop()),
                       asyncio.create_task(self.instances.reap_idle_forever()),
                       asyncio.create_task(self.instances.maintain_forever()),
                       asyncio.create_task(self.instances.keep_leases_forever())]
        if self.tls is not None:
            self._tasks.append(asyncio.create_task(self.tls.poll_forever()))
        log.info("pgsni listening on %s:%d for *.%s (data root %s, storage %s)", s.listen_host,
                 self.port, ", *.".join(s.domains), self.catalog.root, self.backend.describe())
        if s.create_on_connect:
            log.warning("DEVELOPMENT MODE: unknown databases are created on first connect with "
                        "password %r for role postgres (not a superuser). Never use this in "
                        "production.", s.dev_password)
            self._refill_spares()
        if (s.allow_superuser_login or s.superuser_login_databases) and not s.instance_uid_base:
            log.warning("superuser logins are allowed and every database runs as one OS user: a "
                        "superuser can read and change every other database on this machine")

    def _refill_spares(self) -> None:
        """Keep `spare_clones` copies of the template ready (in a thread, one refill at a time),
        so that creating a database is a rename instead of a copy of ~1000 files."""
        if self.settings.spare_clones > 0 and (self._spare_task is None or self._spare_task.done()):
            self._spare_task = asyncio.ensure_future(asyncio.to_thread(self._fill_spares))

    def _fill_spares(self) -> None:
        try:
            self.catalog.fill_spares(self.settings.spare_clones)
        except Exception as e:  # a spare is an optimisation: never let it hurt a create
            log.warning("could not prepare a spare copy of the template: %s", e)

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop accepting, let clients finish for `shutdown_grace` seconds, then stop every
        instance with a fast shutdown (clients get Postgres' own termination message)."""
        if self.shutting_down:
            await self._stopped.wait()
            return
        self.shutting_down = True
        log.info("shutting down: %d client(s) connected", len(self.sessions))
        for t in self._tasks:
            t.cancel()
        if self._listener is not None:
            self._listener.close()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=self.settings.shutdown_grace)
        await self.instances.stop_all()
        remote.close_all(self)  # remote routes' clients: no instance here to terminate them
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=5)
        for t in list(self.sessions):
            t.cancel()
        await self.backend.close()
        await self._detach()
        await self._close_admin()  # last: /readyz said "draining" until here
        self._stopped.set()
        log.info("stopped")

    def _use_tls(self, material: TLSMaterial) -> None:
        """A new pair from storage: new connections get it, open ones keep theirs."""
        self.ssl_context, self.cert_pem = material.context, material.cert_pem

    # --- accepting ---------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, addr = await loop.sock_accept(self._listener)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.error("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handle(sock, addr))
            self.sessions.add(task)
            task.add_done_callback(self.sessions.discard)

    async def _handle(self, sock: socket.socket, addr) -> None:
        # caps are checked at accept; a refused client still gets TLS and a readable
        # ErrorResponse (after its startup message), and is not counted
        ip = addr[0] if isinstance(addr, tuple) else str(addr)
        refusal = self.limits.admit(ip)
        try:
            await self._handle_client(sock, addr, refusal)
        finally:
            if refusal is None:
                self.limits.leave(ip)

    async def _handle_client(self, sock: socket.socket, addr, refusal) -> None:
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn, info = await asyncio.wait_for(self._open(sock, peer), self.settings.handshake_timeout)
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
        await Session(self, conn, info, refusal).run()

    async def _open(self, sock: socket.socket, peer: str) -> tuple[PgConnection | None, ClientInfo]:
        """Read the opening bytes ourselves, so that nothing past them is consumed before TLS."""
        loop = asyncio.get_running_loop()
        while True:
            first = await _peek(loop, sock)
            if not first:
                return None, ClientInfo(peer, False)
            if first[0] == p.TLS_HANDSHAKE_BYTE:
                return await self._start_tls(sock, peer, direct=True)
            head = await _recv_exactly(loop, sock, 8)
            if len(head) < 8:
                return None, ClientInfo(peer, False)
            length, code = struct.unpack("!ii", head)
            if code == p.SSL_REQUEST_CODE and length == 8:
                await loop.sock_sendall(sock, b"S")
                return await self._start_tls(sock, peer, direct=False)
            if code == p.GSSENC_REQUEST_CODE and length == 8:
                await loop.sock_sendall(sock, b"N")  # no GSSAPI; the client carries on
                continue
            # a plain StartupMessage or CancelRequest: the reader takes it from here
            conn = self._new_connection(prefix=head)
            await loop.connect_accepted_socket(lambda: conn, sock)
            return conn, ClientInfo(peer, False)

    def _new_connection(self, prefix: bytes = b"") -> PgConnection:
        reader = p.MessageReader(startup=True, max_length=self.settings.max_message_size)
        return PgConnection(reader, prefix=prefix)

    async def _start_tls(self, sock: socket.socket, peer: str, direct: bool) -> tuple[PgConnection, ClientInfo]:
        loop = asyncio.get_running_loop()
        conn = self._new_connection()
        cert_pem = self.cert_pem  # the certificate this handshake presents, for channel binding
        # with ssl=, the returned protocol is the loop's TLS wrapper, so keep our own reference
        transport, _ = await loop.connect_accepted_socket(
            lambda: conn, sock, ssl=self.ssl_context,
            ssl_handshake_timeout=self.settings.handshake_timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj else None
        log.debug("TLS from %s: direct=%s sni=%s alpn=%s", peer, direct, server_name(sslobj), alpn)
        cipher = sslobj.cipher() if sslobj else None
        return conn, ClientInfo(peer, True, server_name(sslobj), cert_pem,
                                sslobj.version() if sslobj else None, cipher[0] if cipher else None)


def open_databases(settings: Settings, catalog: LocalCatalog, backend) -> Databases:
    return Databases(catalog, snapshot_store(settings, backend),
                     budget_bytes=settings.cache_budget_mb << 20,
                     cache_seconds=settings.auth_cache_seconds)


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


def run(settings: Settings) -> None:
    """Run the gateway until SIGTERM or SIGINT (the CLI's `serve`)."""
    import signal

    import uvloop

    async def main() -> None:
        gw = Gateway(settings)
        loop = asyncio.get_running_loop()
        stop_requested = False

        def on_signal() -> None:
            nonlocal stop_requested
            stop_requested = True
            if starting.done():
                asyncio.ensure_future(gw.shutdown())

        # handlers before start-up (which can take seconds: initdb, orphans, recovery), so a
        # SIGTERM then still ends in an orderly shutdown rather than the default kill
        starting = asyncio.ensure_future(gw.start())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await starting
        if stop_requested:
            log.info("stop requested during start-up")
            await gw.shutdown()
            return
        started = time.monotonic()
        await gw.serve_forever()
        log.debug("served for %.0fs", time.monotonic() - started)

    uvloop.run(main())
