"""Forwarding a client to the gateway that holds its database (issue 17).

A client may reach any gateway of the fleet (anycast, a load balancer). Before its TLS
begins, the gateway peeks at the ClientHello's server name (gateway/wire/clienthello.py);
if another live gateway holds that database's lease, the untouched byte stream goes there
over a link and that gateway serves it as if the client had come to it. The link's mutual
TLS (links.py) authenticates the hand-over; the client's own TLS then crosses it bare
(bare_link.py says why that is safe) and ends at the holder, so SCRAM, channel binding (every gateway presents the same wildcard
certificate), pids, cancel keys and errors are exactly the holder's. The forwarding gateway
only copies bytes it cannot read.

Why this path: it needs nothing new between client and holder (no second TLS termination,
no re-authentication, no secrets on the forwarder) and costs neither gateway any crypto
beyond the client's own session, which only the holder runs. Terminating TLS first is needed only for clients that name their
database in the startup message (`options=endpoint=`, no server name): for those the
session is handed over after TLS ended here (`hand_session`, a link of kind `session`):
the holder gets the startup message and the TLS facts it needs (the certificate the
client's TLS used, for channel binding) and authenticates the client itself; this gateway
relays the session's plain protocol bytes inside the link's TLS.

Where a database is held: the gateway holds it itself, or no live gateway does (it is then
claimed here as before), or the lease (`dbs/<id>/lease.json`, read at most once a second
per database) names a gateway whose heartbeat is alive and publishes an address. Anything
unclear (storage down or slow, a holder without an address, a link that fails) serves the client
here: the lease still decides who may run the database, so this is never unsafe, at worst
a 57P03 as without forwarding. A forwarded connection is never forwarded again.

Placement: a database nobody holds is claimed and started where its client arrived, unless
this gateway is full (max_instances running and none idle to stop for it): then the client
goes to the least loaded live gateway with room, by the load in the heartbeats (as fresh as
their last renewal, lease_seconds / 3), which starts it.

Drains (SIGTERM on a gateway of the fleet): the draining gateway says so in its heartbeat,
saves its databases and gives their leases up, and takes no forwarded clients any more. A
client of a database whose holder drains goes to that database's successor: of the live
gateways that do not drain, the one a rendezvous hash of (database, gateway name) ranks
first, so every gateway sends that database's clients to the same one, which waits for the
lease (compute/lifecycle.py) and serves them once the holder has let go. The draining
gateway keeps its public listener open until its databases are saved, and sends every new
client to a successor the same way.

Paths: a gateway is reached at the address Peers gives it (peers.py): a worker of this
machine's own supervisor (gateway/workers.py) at its local channel, where the client's socket
itself is passed (local_links.py), any other gateway at its network address, over a link. One
Forwarding serves both, choosing per target by the address's form (`hand_over`,
`hand_session`, `ask`): the workers of a machine with links use both."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import time
from typing import Awaitable, Callable, TypeVar

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.wire import link as wire
from storage.errors import StorageError
from storage.heartbeats import Heartbeat
from storage.leases import Leases

from . import links, local_links
from .bare_link import BARE, HandTLS
from .conn import PgConnection
from .links import (LINK_TIMEOUT, BareHandler, BareLink, Link, LinkUnreachable, ServeHere, ServeSession,
                    peer_address)
from .peek import hello_is
from .peers import REFRESH_SECONDS, Peers
from .sockets import connect_tcp
from .routing import id_from_sni

log = logging.getLogger("pgsni.forward")

HOLDER_CACHE_SECONDS = 1.0  # a database's lease is read at most this often to place its clients
T = TypeVar("T")
DRAINING = "this gateway is shutting down"  # the refusal of a forwarded client while draining

# what is left to run where a client arrived once it is handed over (until it leaves): copying
# bytes between the client and a bare link, or nothing for a socket passed to a local worker
HandedOver = Awaitable[None]


class Forwarding:
    """This gateway's side of forwarding: where a client belongs, and the two byte pumps."""

    def __init__(self, settings: Settings, leases: Leases, peers: Peers, context: ssl.SSLContext | None,
                 running: Callable[[str], bool], full: Callable[[], bool] = lambda: False,
                 passed: Callable[[str], None] = lambda direction: None) -> None:
        """`running(db_id)`: whether this gateway runs (or is starting) the database; `full()`:
        whether it has no room for one more (compute/instances.py); `context`: the links'
        client TLS (None: no links to other machines, only to the workers of this one);
        `passed("out")`: told of each client passed to another worker (metrics)."""
        self.settings, self.leases, self.peers, self.context = settings, leases, peers, context
        self._running, self._full, self._passed = running, full, passed
        self._holders: dict[str, tuple[float, str | None]] = {}
        self.forwarded = 0  # clients sent to another gateway
        self.served = 0  # clients another gateway sent here
        self.draining = False  # this gateway shuts down: new clients go to the others

    async def holder_elsewhere(self, server_name: str | None, fresh: bool = False) -> str | None:
        """The address of the other gateway that serves the database `server_name` names (its
        holder, or its successor while the holder drains), or None to serve the client here
        (see the module doc). `fresh`: read the lease and the live gateways again now."""
        if not server_name:
            return None
        try:
            db_id = id_from_sni(server_name, self.settings.domains)
        except GatewayError:
            return None  # the session refuses the name with the proper error
        return await self.serves_elsewhere(db_id, fresh)

    async def serves_elsewhere(self, db_id: str, fresh: bool = False) -> str | None:
        """As `holder_elsewhere`, for a database id (one a startup message named)."""
        if not self.leases.enabled or db_id in self.settings.remote_routes:
            return None
        if not self.draining and (db_id in self.leases.held or self._running(db_id)):
            return None
        if fresh:
            self.forget(db_id)
        age = 0.0 if fresh else REFRESH_SECONDS
        holder = await self._holder(db_id)
        if not self.draining:
            if holder is None and self._full():
                return self._roomiest(db_id, await self.peers.others(age))
            if holder is None or holder == self.leases.holder:
                return None
        others = await self.peers.others(age)
        live = next((p for p in others if p.holder == holder), None)  # never this gateway
        if live is not None and not live.draining:
            return live.address
        if self.draining or live is not None:  # this gateway or the holder drains
            return self._successor(db_id, others, with_me=not self.draining)
        return None  # its heartbeat expired (or names no address): claimed here once it may be

    def _roomiest(self, db_id: str, others: list[Heartbeat]) -> str | None:
        """Where a database nobody holds goes when this gateway is full: the address of the
        live gateway with room (by its heartbeat's load) that is least loaded (None: none)."""
        # a load read from the bucket may lack a key or hold any integer (a damaged or older
        # heartbeat): such a gateway has no room, rather than failing every placement
        room = [p for p in others if not p.draining and 0 <= p.load.get("running", -1) < p.load.get("max", 0)]
        if not room:
            return None
        return min(room, key=lambda p: (p.load["running"] / p.load["max"], _rank(db_id, p.holder))).address

    def _successor(self, db_id: str, others: list[Heartbeat], with_me: bool) -> str | None:
        """Where a database goes while its holder drains: the address of the live gateway that
        does not drain and ranks first for it (None: this gateway, or nobody)."""
        me = self.leases.holder
        names = {p.holder: p.address for p in others if not p.draining}
        if with_me:
            names[me] = None
        if not names:
            return None
        return names[max(names, key=lambda name: _rank(db_id, name))]

    async def _holder(self, db_id: str) -> str | None:
        now = time.monotonic()
        cached = self._holders.get(db_id)
        if cached is not None and now - cached[0] < HOLDER_CACHE_SECONDS:
            return cached[1]
        try:
            holder = await self.leases.holder_of(db_id)
        except StorageError as e:
            log.info("where %s is held is unknown (storage: %s): its client is served here", db_id, e)
            return None
        if len(self._holders) > 10_000:
            self._holders.clear()
        self._holders[db_id] = (now, holder)
        return holder

    async def link_for(self, what: str, find: Callable[[bool], Awaitable[str | None]],
                       take: Callable[[str], Awaitable[T]]) -> T | None:
        """`take(address)` at the gateway `find(fresh)` names, asked again (fresh) once if it
        drains; None to serve the client here: nobody named, storage too slow to say where
        (logged), or the link failed (logged)."""
        for fresh in (False, True):
            address = await self._where(what, find, fresh)
            if address is None:
                return None
            try:
                return await take(address)
            except HolderDraining:
                continue  # it shuts down, and its heartbeat said so only just now: ask again
            except LinkUnreachable as e:
                log.warning("%s served here: %s", what, e)
                return None
        return None

    async def _where(self, what: str, find: Callable[[bool], Awaitable[str | None]], fresh: bool) -> str | None:
        """`find(fresh)` within a part of the client's handshake_timeout: storage that answers
        slowly (its retries take far longer) must not spend the whole handshake, which would
        leave the client dropped without a word instead of served here (with 57P03 if storage
        is needed and still slow)."""
        limit = min(LINK_TIMEOUT, self.settings.handshake_timeout / 3)
        try:
            async with asyncio.timeout(limit):
                return await find(fresh)
        except TimeoutError:
            log.warning("%s served here: storage did not say within %g s where its database is held", what, limit)
            return None

    def forget(self, db_id: str) -> None:
        self._holders.pop(db_id, None)

    # --- the forwarding gateway ------------------------------------------------------------------
    async def hand_over(self, sock: socket.socket, address: str, peer: str, direct: bool,
                        hello: bytes) -> HandedOver:
        """Give the client on `sock` to the holder at `address` (its socket to a worker of this
        machine, else its bytes over a bare link); LinkUnreachable if it did not take it (the
        client is then served here)."""
        if local_links.is_local(address):
            await local_links.pass_client(sock, address, peer, direct)
            self._count_passed()
            return _forget(sock)
        link, first = await self._open_bare(address, wire.forward_request(wire.Forwarded(peer, direct, hello)))
        return splice(sock, link, first)

    async def hand_session(self, address: str, handed: wire.HandedSession, startup: bytes,
                           new_connection: Callable[[], PgConnection]
                           ) -> tuple[PgConnection, object]:
        """A session whose TLS ended here, handed to the gateway at `address` (it named its
        database in its startup message only): the link as a connection that carries the
        holder's side of the session, the startup message sent on it (and what to keep while
        it is used: the link's writer, which closes its transport when it goes).
        LinkUnreachable if the holder did not take it (the client is then served here). To a
        worker of this machine, a socket pair carries it instead (local_links.py)."""
        if local_links.is_local(address):
            handed_session = await local_links.pass_session(address, handed, startup, new_connection)
            self._count_passed()
            return handed_session
        _, writer, rest = await self._open(address, wire.session_request(handed))
        far = new_connection()
        link = writer.transport
        # nothing more arrives before the startup message is sent: the protocol changes hands
        link.set_protocol(far)
        far.connection_made(link)
        if rest:
            far.data_received(rest)
        far.send(startup)
        return far, writer

    async def ask(self, address: str, request: wire.Request) -> wire.Reply:
        """CancelRelay's `ask`: `request` to the gateway at `address`, a worker of this machine
        or one over a link; LinkUnreachable if it did not take it."""
        if local_links.is_local(address):
            return await local_links.ask(address, request)
        return await links.ask(self._link_context(address), address, request)

    def _count_passed(self) -> None:
        self.forwarded += 1
        self._passed("out")

    def _link_context(self, address: str) -> ssl.SSLContext:
        """The links' client TLS; LinkUnreachable without links to other machines."""
        if self.context is None:
            raise LinkUnreachable(f"gateway {address} is on a link, and this gateway has none "
                                  "(no advertise_address)")
        return self.context

    async def _open(self, address: str, request: wire.Request
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """A link to the gateway at `address` that has accepted `request`, and what came after
        its reply; LinkUnreachable (HolderDraining: it shuts down) if it did not."""
        reader, writer, reply, rest = await links.open_link(self._link_context(address), address, request)
        self._taken(address, reply, writer.close)
        return reader, writer, rest

    async def _open_bare(self, address: str, request: wire.Request) -> tuple[socket.socket, bytes]:
        """A bare link (bare_link.py) to the gateway at `address` that has accepted `request`,
        and what came after its reply; LinkUnreachable (HolderDraining) if it did not."""
        context = self._link_context(address)
        host, port = peer_address(address)
        sock = None
        try:
            async with asyncio.timeout(LINK_TIMEOUT):
                sock = await connect_tcp(host, port)
                await asyncio.get_running_loop().sock_sendall(sock, BARE)
                tls = HandTLS(sock, context, server_side=False)
                await tls.handshake()
                await tls.send(request)
                reply = await tls.read_message()
        except BaseException as e:  # also cancelled (the client's opening ran out of time)
            if sock is not None:
                sock.close()
            raise links.unreachable(address, e, LINK_TIMEOUT) from None
        self._taken(address, reply, sock.close)
        return sock, tls.rest()

    def _taken(self, address: str, reply: wire.Request | wire.Reply, close: Callable[[], None]) -> None:
        """Count a client the gateway at `address` took; else `close()` the link and raise
        LinkUnreachable (HolderDraining: it shuts down)."""
        if not isinstance(reply, wire.Reply) or reply.status is not wire.Status.DONE:
            close()
            text = getattr(reply, 'text', reply)
            raise (HolderDraining if text == DRAINING else LinkUnreachable)(
                f"gateway {address} did not take the client: {text}")
        self.forwarded += 1

    # --- the holder ------------------------------------------------------------------------------
    def handler(self, serve_here: ServeHere) -> BareHandler:
        """The bare link handler of forward requests: accept, then serve the client, whose TLS
        begins on the link's socket once the forwarding gateway has the reply."""
        async def handle(request: wire.Request, link: BareLink) -> None:
            client = wire.forward_payload(request.payload)
            if not client.hello:
                raise wire.LinkError("a forward request on a link names the client's ClientHello")
            self._check_accepted(link.tls.rest(), client.peer, link.peer)
            await link.tls.send(wire.Reply())
            link.taken = True  # the socket is this handler's to close from here on
            # the bare stream is no longer the link's TLS: its first bytes must be what the
            # forwarding gateway saw, else someone put them on the connection in between
            try:
                same = await hello_is(link.sock, client.hello, self.settings.handshake_timeout)
            except OSError as e:  # reset before the ClientHello came
                log.info("a client forwarded by gateway %s as %s left before its ClientHello: %s",
                         link.peer, client.peer, e)
                link.sock.close()
                return
            if not same:
                log.warning("a client forwarded by gateway %s as %s began with a ClientHello other "
                            "than the one that gateway saw (or none in time): dropped", link.peer, client.peer)
                link.sock.close()
                return
            await serve_here(link.sock, client.peer, client.direct)
        return handle

    def session_handler(self, serve_session: ServeSession):
        """The link handler of session requests: accept, then serve the session whose startup
        message comes next on the link."""
        async def handle(request: wire.Request, link: Link) -> None:
            handed = wire.session_payload(request.payload)
            self._check_accepted(link.rest, handed.peer, link.peer)
            # the forwarder sends the startup message once it has the reply: it must stay
            # unread until this gateway's connection takes the link over (and resumes
            # reading), or the link's stream would swallow it
            link.writer.transport.pause_reading()
            link.writer.write(wire.Reply().encode())
            link.taken = True
            await serve_session(link.writer.transport, handed)
        return handle

    def _check_accepted(self, rest: bytes, client: str, link: str) -> None:
        """A handed client is taken (counted), unless this gateway drains or the request was
        followed by bytes before its reply (LinkError)."""
        if self.draining:  # the forwarder asks again where the client goes
            raise wire.LinkError(DRAINING)
        if rest:
            raise wire.LinkError("bytes after a request before its reply")
        self.served += 1
        log.debug("serving %s, forwarded by gateway %s", client, link)


async def _forget(sock: socket.socket) -> None:
    """The worker it was passed to has its own descriptor of the client: closing ours ends
    nothing."""
    sock.close()


class HolderDraining(LinkUnreachable):
    """The gateway asked to take a client shuts down (its heartbeat may not say so yet)."""


def _rank(db_id: str, gateway: str) -> bytes:
    return hashlib.sha256(f"{db_id}\0{gateway}".encode()).digest()


class _Splice(asyncio.Protocol):
    """One side of a splice: what arrives is written to the other side, with flow control.
    Reading starts only once both sides are connected (`splice`)."""

    def __init__(self, done: asyncio.Future) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: "_Splice | None" = None
        self.done = done
        self.ended = False  # the EOF of this side arrived (and was passed on)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.other.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.ended = True
        other = self.other
        if other.ended:  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
            return False
        other.transport.write_eof()  # type: ignore[union-attr]
        return True  # the other direction goes on

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.other.transport.close()  # type: ignore[union-attr]
        if not self.done.done():
            self.done.set_result(None)


async def splice(sock: socket.socket, link: socket.socket, first: bytes = b"") -> None:
    """Copy bytes both ways between a client's socket and a bare link (`first`: what came
    after the link's reply, for the client) until either side closes; then close both."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    client, far = _Splice(done), _Splice(done)
    client.other, far.other = far, client
    try:
        await loop.connect_accepted_socket(lambda: far, link)
    except BaseException:
        link.close()
        sock.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: client, sock)
    except BaseException:
        far.transport.close()  # type: ignore[union-attr]
        sock.close()
        raise
    if first:
        client.transport.write(first)  # type: ignore[union-attr]
    client.transport.resume_reading()  # type: ignore[union-attr]
    far.transport.resume_reading()  # type: ignore[union-attr]
    try:
        await done
    finally:
        client.transport.close()  # type: ignore[union-attr]
        far.transport.close()  # type: ignore[union-attr]
