"""Links whose TLS ends with their reply: a `forward` link (forward.py) is authenticated like
every link (mutual TLS with the cluster CA, links.py), but once the holder has accepted the
client, the TCP connection carries the client's own TLS bytes bare. They need no second
layer: the client's TLS runs end to end between the client and the holder, which checks
every record, so a byte changed or added on the way (by anyone able to inject into the
gateways' TCP connection) ends the client's session as it would on its direct path. What
the client's TLS cannot bind is who began it: someone injecting could put a ClientHello of
their own first and be served as the forwarded client (its address: its limits, its log
lines). So the request carries the SHA-256 of the ClientHello the forwarding gateway saw
(inside the link's TLS), and the holder takes the connection only if it begins with exactly
that one; from there the client's handshake transcript covers the rest.
Dropping the link's layer saves both gateways an encryption and a decryption per message
and lets the holder take the connection as a plain socket, as it takes one it accepted.

The link's TLS is driven by hand (ssl.SSLObject over memory buffers, on the non-blocking
socket) rather than by the event loop's TLS transport, which cannot hand its socket back.
That it can be dropped without a closing exchange rests on the request/reply turns: the
forwarding gateway sends nothing after its request until the reply has come, and the holder
sends nothing after its reply until the client's ClientHello has reached it. So neither side
ever holds bytes of the bare stream in its TLS buffers; OpenSSL reads one record at a time
from the buffer it is given, and whatever it has not read (`rest`) is handed on anyway.

On the wire: the forwarding gateway sends the byte `BARE`, then the TLS handshake, the
request and the reply as on any link. A link that opens with a TLS record (0x16) is an
ordinary one (links.py tells the two apart by peeking at that byte)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from gateway.wire.link import LinkError, LinkReader, Reply, Request

BARE = b"B"  # the first byte of a link whose TLS ends with its reply
READ_CHUNK = 16384
ALERT_TIMEOUT = 1.0  # for a failed handshake's alert to go out


class HandTLS:
    """TLS on a non-blocking socket for one request and its reply, driven by hand."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side)

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError:
                # the alert saying why (an unknown CA, an expired certificate) goes out first,
                # so that the other side's log tells the operator
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(ALERT_TIMEOUT):
                        await self._flush()
                raise
        await self._flush()

    async def send(self, message: Request | Reply) -> None:
        self.tls.write(message.encode())
        await self._flush()

    async def read_message(self) -> Request | Reply:
        """The link's one message; LinkError if malformed or followed by more inside the TLS
        (nothing may follow it there), ConnectionError if the other side left first."""
        decoder = LinkReader()
        while (msg := decoder.next_message()) is None:
            decoder.receive_data(await self._read())
        if decoder.rest():
            raise LinkError("bytes after a request before its reply" if isinstance(msg, Request)
                            else "bytes after a reply inside the link's TLS")
        return msg

    def rest(self) -> bytes:
        """What arrived after the last TLS record read: the start of the bare stream."""
        return self._in.read()

    def peer_certificate(self) -> dict:
        return self.tls.getpeercert() or {}

    async def _read(self) -> bytes:
        while True:
            try:
                data = self.tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:
                raise ConnectionError("the other gateway ended the link's TLS before a whole message")
            return data

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, READ_CHUNK)
        if not data:
            raise ConnectionError("the other gateway closed the link")
        self._in.write(data)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
