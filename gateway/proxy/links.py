"""Links between gateways over mutual TLS (certs/cluster.py): the internal listener, which
answers each link's one request (gateway/wire/link.py) with the handler of its kind, and
`ask`, which opens a link to a peer, sends a request and reads the reply. A peer without a
certificate of the cluster CA is refused in the TLS handshake, before a byte is read."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

from gateway.config import ConfigError, host_port
from gateway.wire.link import HandedSession, Kind, LinkError, LinkReader, Reply, Request, Status

from .bare_link import BARE, HandTLS
from .peek import peek_first
from .sockets import accept_forever, keep_alive

log = logging.getLogger("pgsni.links")

LINK_TIMEOUT = 3.0  # connect, TLS, request and reply of one link, and a request's arrival
READ_CHUNK = 4096

# serves a forwarded client on this gateway: (the link's socket, client address, direct TLS)
ServeHere = Callable[[socket.socket, str, bool], Awaitable[None]]
# serves a handed session (its TLS ended at the forwarder) on this gateway, on the link (or a
# socket pair another worker of this machine passed)
ServeSession = Callable[[asyncio.Transport | socket.socket, HandedSession], Awaitable[None]]


@dataclass
class Link:
    """One accepted link, as its request's handler sees it. A kind that carries a stream
    (the next step: a client's TLS bytes for the database's holder) answers through `writer`
    itself, goes on with `rest` and `reader`, and returns None; the link is closed after."""

    peer: str  # the peer's certificate name and address, for log lines
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    rest: bytes  # bytes that arrived after the request: the start of its stream
    taken: bool = False  # set by a handler once it replied and its stream began


Handler = Callable[[Request, Link], Awaitable[Reply | None]]


@dataclass
class BareLink:
    """One accepted bare link (bare_link.py), as its request's handler sees it: it answers
    through `tls`, then carries the stream on `sock` itself, and returns None (the socket is
    then its own to close); or it returns a reply, and the link is closed after."""

    peer: str
    sock: socket.socket
    tls: HandTLS
    taken: bool = False  # set by a handler once it replied: the socket is then its own


BareHandler = Callable[[Request, BareLink], Awaitable[Reply | None]]


class LinkUnreachable(Exception):
    """A peer did not answer a link request: not reachable, refused our certificate, vanished
    or answered something malformed. The text names the peer and the reason."""


async def read_message(reader: asyncio.StreamReader) -> tuple[Request | Reply, bytes]:
    """The link's one message, and the bytes after it (the start of its stream); LinkError if
    malformed, ConnectionError if the other side left first."""
    decoder = LinkReader()
    while (msg := decoder.next_message()) is None:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionError("the other gateway closed the link before a whole message")
        decoder.receive_data(data)
    return msg, decoder.rest()


def peer_address(address: str) -> tuple[str, int]:
    """HOST:PORT of a peer, as its heartbeat publishes it; LinkUnreachable if malformed (a
    client is then served here, a relayed cancel skips that gateway)."""
    try:
        return host_port("peer address", address)
    except ConfigError as e:
        raise LinkUnreachable(str(e)) from None


async def open_link(context: ssl.SSLContext, address: str, request: Request, timeout: float = LINK_TIMEOUT
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Request | Reply, bytes]:
    """A link to the gateway at `address` (HOST:PORT) with `request` sent and its answer read:
    the link's reader and writer, the answer, and the bytes after it (the start of its
    stream). LinkUnreachable if that failed (the link is then closed)."""
    host, port = peer_address(address)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                           ssl_handshake_timeout=timeout)
            keep_alive(writer.get_extra_info("socket"))  # a session link may stay open for hours
            writer.write(request.encode())
            await writer.drain()
            reply, rest = await read_message(reader)
    except BaseException as e:
        if writer is not None:
            writer.close()
        raise unreachable(address, e, timeout) from None
    return reader, writer, reply, rest


def unreachable(address: str, error: BaseException, timeout: float) -> BaseException:
    """What opening a link to `address` raises for `error`: LinkUnreachable saying why for a
    timeout, a network or TLS failure or a malformed answer; anything else (a cancellation)
    as it is."""
    if isinstance(error, TimeoutError):
        return LinkUnreachable(f"gateway {address} did not answer within {timeout:g} s")
    if isinstance(error, (OSError, LinkError)):  # ssl.SSLError and ConnectionError are OSErrors
        return LinkUnreachable(f"gateway {address}: {error or type(error).__name__}")
    return error


async def ask(context: ssl.SSLContext, address: str, request: Request,
              timeout: float = LINK_TIMEOUT) -> Reply:
    """Send `request` to the gateway at `address` (HOST:PORT) and return its reply."""
    _, writer, reply, _ = await open_link(context, address, request, timeout)
    writer.close()
    if not isinstance(reply, Reply):
        raise LinkUnreachable(f"gateway {address} answered with a request, not a reply")
    if reply.status is not Status.DONE:
        raise LinkUnreachable(f"gateway {address} refused the {request.kind.value} request: {reply.text}")
    return reply


class LinkServer:
    """The internal listener (`cluster_listen`): one request per link, answered by the
    handler of its kind. A link that opens with `BARE` (bare_link.py) is served by
    `bare_handlers`, every other one by `handlers`."""

    def __init__(self, address: str, context: ssl.SSLContext, handlers: dict[Kind, Handler],
                 handshake_timeout: float,
                 count: Callable[[str, str], None] = lambda kind, result: None,
                 bare_handlers: "dict[Kind, BareHandler] | None" = None) -> None:
        """`count(kind, result)` is told of each link's outcome (metrics)."""
        self.host, self._port = host_port("cluster_listen", address)
        self.context, self.handlers, self.handshake_timeout = context, handlers, handshake_timeout
        self.bare_handlers = bare_handlers or {}
        self.count = count
        self._socks: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._socks[0].getsockname()[1]

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self._port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(128)
                sock.setblocking(False)
        except OSError as e:
            self._close_socks()
            raise OSError(f"cannot listen for other gateways on cluster_listen "
                          f"{self.host}:{self._port}: {e.strerror or e}") from None
        for sock in self._socks:
            self._track(accept_forever(sock, lambda link, address: self._track(self._serve(link, address), name="link"),
                                       "a link"))

    async def close(self) -> None:
        """Stop listening; links already accepted go on (a forwarded client's session)."""
        accepting = [t for t in self._tasks if t.get_name() == "link-accept"]
        for task in accepting:
            task.cancel()
        await asyncio.gather(*accepting, return_exceptions=True)
        self._close_socks()

    def _close_socks(self) -> None:
        for sock in self._socks:
            sock.close()

    def _track(self, coro, name: str = "link-accept") -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, address: str) -> None:
        """Tell a bare link from an ordinary one by its first byte, and serve it; the socket
        is closed after, unless a kind that carries a stream took it over. The first byte and
        the TLS handshake have handshake_timeout together."""
        keep = False
        deadline = asyncio.get_running_loop().time() + self.handshake_timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout_at(deadline):
                first = await peek_first(sock)
            if first == BARE:
                sock.recv(1)
                keep = await self._serve_bare(sock, address, deadline)
            elif first:
                keep = True  # its TLS transport owns the socket: closing it is the transport's
                await self._serve_tls(sock, address, deadline)
        except TimeoutError:
            log.info("a link from %s sent nothing within %g s", address, self.handshake_timeout)
        except OSError as e:
            log.info("a link from %s ended early: %s", address, e)
        finally:
            if not keep:
                sock.close()

    async def _serve_tls(self, sock: socket.socket, address: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.context,
                ssl_handshake_timeout=max(0.1, deadline - loop.time()))
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            log.info("refused a link from %s at the TLS handshake: %s", address, e)
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        peer = _peer_name(writer.get_extra_info("peercert"), address)

        async def read() -> tuple[Request | Reply, bytes]:
            return await read_message(reader)

        link = Link(peer, reader, writer, b"")

        async def answer(request: Request, rest: bytes) -> Reply | None:
            link.rest = rest
            return await self.handlers[request.kind](request, link)

        async def send(reply: Reply) -> None:
            if not link.taken:  # else the stream is the handler's: no reply may go into it
                writer.write(reply.encode())
                await writer.drain()

        try:
            await self._dispatch(peer, read, self.handlers, answer, send)
        finally:
            writer.close()

    async def _serve_bare(self, sock: socket.socket, address: str, deadline: float) -> bool:
        """A bare link: True if its handler took the socket over."""
        tls = HandTLS(sock, self.context, server_side=True)
        try:
            async with asyncio.timeout_at(deadline):
                await tls.handshake()
        except (OSError, TimeoutError) as e:
            log.info("refused a bare link from %s at the TLS handshake: %s", address, e)
            return False
        peer = _peer_name(tls.peer_certificate(), address)

        async def read() -> tuple[Request | Reply, bytes]:
            return await tls.read_message(), b""

        link = BareLink(peer, sock, tls)

        async def answer(request: Request, rest: bytes) -> Reply | None:
            return await self.bare_handlers[request.kind](request, link)

        async def send(reply: Reply) -> None:
            if not link.taken:  # else the socket is the client's: no link TLS may go into it
                await tls.send(reply)

        return await self._dispatch(peer, read, self.bare_handlers, answer, send) or link.taken

    async def _dispatch(self, peer: str, read, handlers: dict, answer, send) -> bool:
        """Read the link's request, answer it with its kind's handler, send the reply; True if
        the handler answered itself and carried a stream."""
        reply, kind, streamed = None, "invalid", False
        try:
            async with asyncio.timeout(LINK_TIMEOUT):
                request, rest = await read()
            if not isinstance(request, Request):
                raise LinkError("a link opens with a request, not a reply")
            kind = request.kind.value
            if request.kind not in handlers:
                raise LinkError(f"this gateway does not serve {request.kind.value} requests"
                                + (" on this kind of link" if request.kind in {**self.handlers, **self.bare_handlers}
                                   else ""))
            reply = await answer(request, rest)
            streamed = reply is None  # a kind that carries a stream answered itself and ran it
        except LinkError as e:
            log.warning("refused a link request from gateway %s: %s", peer, e)
            reply = Reply(Status.REFUSED, str(e))
        except TimeoutError:
            log.warning("gateway %s sent no whole request within %g s", peer, LINK_TIMEOUT)
        except (ConnectionError, OSError) as e:
            log.info("gateway %s left the link early: %s", peer, e)
        except Exception:  # noqa: BLE001  (one bad request must not end the listener's work)
            log.exception("serving a link request from gateway %s failed", peer)
            reply = Reply(Status.REFUSED, "internal error in the gateway; its log has the details")
        self.count(kind, "done" if streamed or (reply is not None and reply.status is Status.DONE)
                   else "incomplete" if reply is None else "refused")
        if reply is not None:
            try:
                await send(reply)
            except (ConnectionError, OSError):
                pass  # it left; nothing more to tell
        return streamed


def _peer_name(cert: dict | None, where: str) -> str:
    """The peer's certificate name and address, for log lines."""
    names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
    return f"{names[-1]} ({where})" if names else where
