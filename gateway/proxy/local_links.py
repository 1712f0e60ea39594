"""Links between the workers of one machine (gateway/workers.py): the fleet's requests
(forward, session, cancel) as datagrams on unix sockets instead of mutual-TLS links.

Each worker binds `<channel_dir>/<index>.sock` (SOCK_DGRAM; the directory is 0700, so only the
gateway's OS user, or root, can send) and publishes `local:<hostname>:<path>` as its address in
its heartbeat. A datagram is one link Request (gateway/wire/link.py), with the client's socket
attached (SCM_RIGHTS) for a forward: the client is handed over before its TLS begins, after the
sending worker has answered its SSLRequest and peeked at the ClientHello's server name, and the
receiving worker begins TLS on that very socket. So no byte of the client's session passes
through two processes, and the sender forgets the client at once. A session whose TLS ended at
the sending worker (a client that named its database in `options=endpoint=` only) cannot be
passed so: the sender makes a socket pair, passes one end with a session request, sends the
startup message on its end and relays the session between the client and it (as with a link to
another machine, without the link's TLS). A cancel needs no reply (the answer is the same
whether the key was known or not), so none is sent.

The kernel keeps a datagram queued until the receiver reads it; a full queue (a worker busy for
a moment) is retried for up to LINK_TIMEOUT, then the client is served where it arrived, as
when a link to another machine fails. A worker's channel is nothing a client could not do on
the public port: a passed socket is served like an accepted one (TLS, SCRAM), a cancel is a
CancelRequest."""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Callable

from gateway.wire import link as wire

from .cancel import CancelTable
from .conn import PgConnection
from .links import LINK_TIMEOUT, LinkUnreachable, ServeSession

log = logging.getLogger("pgsni.local_links")

PREFIX = "local:"
MAX_DATAGRAM = wire.MAX_FRAME + 4  # a request is one link frame (gateway/wire/link.py)
RETRY_PAUSE = 0.002  # between sends while the receiver's queue is full

# takes a client socket another worker passed: (socket, client address, direct TLS)
TakePassed = Callable[[socket.socket, str, bool], None]


def local_address(path: Path) -> str:
    """What a worker publishes in its heartbeat: its socket, on this machine."""
    return f"{PREFIX}{socket.gethostname()}:{path}"


def socket_path(address: str) -> Path:
    """The socket of a worker's address; LinkUnreachable for a gateway on another machine or
    one with a TLS link (workers link only to the workers of their own machine)."""
    host, _, path = address[len(PREFIX):].partition(":") if address.startswith(PREFIX) else ("", "", "")
    if not path or host != socket.gethostname():
        raise LinkUnreachable(f"gateway {address} is not a worker on this machine")
    return Path(path)


async def send(address: str, request: wire.Request, fds: tuple[int, ...] = ()) -> None:
    """One datagram to the worker at `address`; LinkUnreachable if it cannot take it."""
    path = socket_path(address)
    data = request.encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINK_TIMEOUT
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while True:
            try:
                # (socket.send_fds drops its address argument before Python 3.12)
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds
                             else [], 0, str(path))
                return
            except BlockingIOError:
                if loop.time() >= deadline:
                    raise LinkUnreachable(f"worker {path} took nothing within {LINK_TIMEOUT:g} s") from None
                await asyncio.sleep(RETRY_PAUSE)
            except OSError as e:  # not there (restarting), refused
                raise LinkUnreachable(f"worker {path}: {e.strerror or e}") from None


async def ask(address: str, request: wire.Request) -> wire.Reply:
    """CancelRelay's `ask` between workers: sent, and done (no reply travels back)."""
    await send(address, request)
    return wire.Reply()


def is_local(address: str) -> bool:
    """Whether a peer's address is a worker's channel (else HOST:PORT of a network link)."""
    return address.startswith(PREFIX)


async def pass_client(sock: socket.socket, address: str, peer: str, direct: bool) -> None:
    """Pass the client on `sock` to the worker at `address`, which begins its TLS (forward.py's
    hand-over between workers); the caller then closes its copy. LinkUnreachable if it could
    not take it."""
    await send(address, wire.forward_request(wire.Forwarded(peer, direct)), (sock.fileno(),))
    log.debug("client %s passed to worker %s", peer, address)


async def pass_session(address: str, handed: wire.HandedSession, startup: bytes,
                       new_connection: Callable[[], PgConnection]) -> tuple[PgConnection, object]:
    """A session whose TLS ended here, handed to the worker at `address` over a socket pair:
    the connection that carries the holder's side (the startup message sent on it), and what
    to keep while it is used. LinkUnreachable if the worker could not take it."""
    mine, theirs = socket.socketpair()
    try:
        await send(address, wire.session_request(handed), (theirs.fileno(),))
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()  # the other worker has its own descriptor of it now
    far = new_connection()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: far, mine)
    far.send(startup)
    log.debug("session of %s handed to worker %s", handed.peer, address)
    return far, transport


class LocalChannel:
    """This worker's end: takes passed clients and cancel requests from the other workers."""

    def __init__(self, path: Path, take: TakePassed, cancels: CancelTable,
                 count: Callable[[str, str], None] = lambda kind, result: None,
                 serve_session: ServeSession | None = None,
                 passed: Callable[[str], None] = lambda direction: None) -> None:
        """`count(kind, result)`: each request's outcome; `passed("in")`: each client or
        session taken (metrics)."""
        self.path, self.take, self.cancels, self.count = path, take, cancels, count
        self.serve_session, self.passed = serve_session, passed
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self.served = 0

    def describe(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        self.path.unlink(missing_ok=True)  # left by this worker's previous process
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot open the workers' channel {self.path}: {e.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            self.path.unlink(missing_ok=True)
        for task in list(self._tasks):
            task.cancel()

    def _readable(self) -> None:
        while self._sock is not None:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_DATAGRAM, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("reading the workers' channel failed: %s", e)
                return
            self._received(data, fds)

    def _received(self, data: bytes, fds: list[int]) -> None:
        reader = wire.LinkReader()
        kind = "invalid"
        try:
            reader.receive_data(data)
            request = reader.next_message()
            if not isinstance(request, wire.Request) or reader.rest():
                raise wire.LinkError("a datagram is one whole request")
            kind = request.kind.value
            if request.kind is wire.Kind.FORWARD:
                client = wire.forward_payload(request.payload)
                self.take(self._passed(fds, kind, client.peer), client.peer, client.direct)
            elif request.kind is wire.Kind.SESSION and self.serve_session is not None:
                handed = wire.session_payload(request.payload)
                self._spawn(self.serve_session(self._passed(fds, kind, handed.peer), handed))
            elif request.kind is wire.Kind.CANCEL:
                if fds:
                    raise wire.LinkError("a cancel request carries no socket")
                self._spawn(self.cancels.cancel_here(wire.cancel_payload(request.payload)))
            self.count(kind, "done")
        except wire.LinkError as e:
            log.warning("refused a request on the workers' channel: %s", e)
            self.count(kind, "refused")
        finally:
            for fd in fds:  # anything not taken
                os.close(fd)

    def _passed(self, fds: list[int], kind: str, peer: str) -> socket.socket:
        """The one socket a forward or session request carries (taken out of `fds`)."""
        if len(fds) != 1:
            raise wire.LinkError(f"a {kind} request carries one socket")
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:  # a pipe, a file: left in `fds`, so closed with the refusal
            raise wire.LinkError(f"a {kind} request carries a descriptor that is no socket") from None
        fds.pop()
        self.served += 1
        self.passed("in")
        log.debug("serving %s (%s), passed by another worker", peer, kind)
        return sock

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
