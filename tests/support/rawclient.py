"""A bare Postgres wire client over a blocking socket, for tests that need exact control of
the bytes: openings, pipelining, malformed input. It speaks through the project's own codec."""

from __future__ import annotations

import socket
import ssl
import struct

from scramp import ScramClient

from gateway.wire import protocol as p


class RawClient:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = p.MessageReader(startup=False, max_length=1 << 24)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_byte(self) -> bytes:
        return self.sock.recv(1)

    def start_tls(self, ca: str, server_name: str | None, *, request: bool = True,
                  alpn: list[str] | None = None) -> None:
        if request:
            self.send(p.SSLRequest().encode())
            assert self.recv_byte() == b"S"
        ctx = ssl.create_default_context(cafile=ca)
        if server_name is None:
            ctx.check_hostname = False
        if alpn:
            ctx.set_alpn_protocols(alpn)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_name)

    def next_message(self) -> p.Message:
        while True:
            msg = self.reader.next_event()
            if msg is not p.NEED_DATA:
                assert isinstance(msg, p.Message)
                return msg
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.reader.receive_data(data)

    def next_backend(self):
        return p.decode_backend(self.next_message())

    def closed(self) -> bool:
        """True once the server has closed (after draining what it sent)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.reader.receive_data(data)
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def startup(self, params: dict[str, str], minor: int = 0) -> None:
        self.send(p.StartupMessage(3, minor, params).encode())

    def scram(self, user: str, password: str, *, then: bytes = b"", auth=None) -> None:
        """Answer AuthenticationSASL (`auth`, if the caller has read it already); `then` is
        sent right after the final SCRAM message, before the server has answered (pipelining)."""
        auth = auth or self.next_backend()
        assert isinstance(auth, p.Authentication) and auth.code == p.AUTH_SASL, auth
        client = ScramClient(["SCRAM-SHA-256"], user, password)
        first = client.get_client_first().replace(f"n={user},", "n=,", 1)
        bare = first[3:]
        client.client_first_bare = bare  # what libpq signs: the empty user name
        self.send(p.SASLInitialResponse("SCRAM-SHA-256", first.encode()).encode())
        cont = self.next_backend()
        assert isinstance(cont, p.Authentication) and cont.code == p.AUTH_SASL_CONTINUE, cont
        client.set_server_first(cont.data.decode())
        self.send(p.Message(b"p", client.get_client_final().encode()).encode() + then)

    def query(self, sql: str) -> bytes:
        return p.Message(b"Q", sql.encode() + b"\0").encode()

    def send_query(self, sql: str) -> None:
        self.send(self.query(sql))

    def rows(self, sql: str) -> list[list[str | None]]:
        """Run `sql` (simple query): its rows as text, or AssertionError with the server's error."""
        self.send_query(sql)
        rows, error = [], None
        while True:
            msg = self.next_message()
            if msg.type == b"D":
                rows.append(_data_row(msg.body))
            elif msg.type == b"E":
                error = p.decode_error(msg).message
            elif msg.type == b"Z":
                assert error is None, error
                return rows

    def error_text(self) -> str:
        """The message of the next ErrorResponse (messages before it are skipped)."""
        while True:
            msg = self.next_message()
            if msg.type == b"E":
                return p.decode_error(msg).message

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def pack_untyped(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


def _data_row(body: bytes) -> list[str | None]:
    (count,), offset, values = struct.unpack_from("!h", body), 2, []
    for _ in range(count):
        (size,) = struct.unpack_from("!i", body, offset)
        offset += 4
        values.append(None if size < 0 else body[offset:offset + size].decode())
        offset += max(size, 0)
    return values
