"""SCRAM-SHA-256, sans IO: verifiers as Postgres stores them, the server's conversation with
a client (`ScramServer`, scramp's arithmetic), what a client's verified proof reveals (its
ClientKey), and a client conversation that logs in with that key instead of a password.

The gateway checks a client's password itself (gateway/proxy/auth.py); the instance then checks it
again, because the gateway logs in to it with SCRAM too: ClientProof = ClientKey XOR
HMAC(StoredKey, AuthMessage), so once the proof is verified against the stored verifier the
ClientKey follows, and with it (and the ServerKey from the verifier) a new exchange with the
instance. No password is known or kept; a role whose password changed meanwhile is refused
by Postgres itself (RFC 5802, RFC 7677)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from scramp import ScramException, ScramMechanism

from . import protocol as p

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
ITERATIONS = 4096
GS2_HEADER = "n,,"  # no channel binding (a unix socket), no authorization identity


class ScramError(Exception):
    """The other side broke the exchange (bad nonce, bad signature, malformed message)."""


@dataclass(frozen=True)
class ScramKeys:
    """Enough to log in as a role once its client has proven the password: never the password."""

    client_key: bytes
    server_key: bytes

    def __repr__(self) -> str:  # keys never reach a log line
        return "ScramKeys(...)"


@dataclass(frozen=True)
class AuthInfo:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def as_tuple(self) -> tuple[bytes, bytes, bytes, int]:
        return self.salt, self.stored_key, self.server_key, self.iterations


def parse_verifier(verifier: str | None) -> AuthInfo | None:
    """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` as Postgres stores it."""
    if not verifier:
        return None
    try:
        mech, rest = verifier.split("$", 1)
        head, keys = rest.split("$", 1)
        iterations, salt = head.split(":", 1)
        stored, server = keys.split(":", 1)
        if mech != SCRAM:
            return None
        return AuthInfo(base64.b64decode(salt, validate=True), base64.b64decode(stored, validate=True),
                        base64.b64decode(server, validate=True), int(iterations))
    except (ValueError, TypeError):
        return None


def scram_verifier(password: str, iterations: int = ITERATIONS) -> str:
    """The string Postgres stores in `pg_authid.rolpassword` for this password."""
    salt, stored, server, i = ScramMechanism(SCRAM).make_auth_info(password, iteration_count=iterations)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"{SCRAM}${i}:{b64(salt)}${b64(stored)}:{b64(server)}"


class ScramRefused(Exception):
    """The client's messages do not prove the password (or break channel binding)."""

    def __init__(self, message: str, *, channel_binding: bool = False) -> None:
        super().__init__(message)
        self.channel_binding = channel_binding


class ScramServer:
    """The server's side of one exchange: `first(client_first)` -> server-first,
    `final(client_final)` -> (server-final, the role's keys). `channel_binding` is
    ("tls-server-end-point", certificate PEM) on TLS, which lets scramp refuse a downgrade.
    Malformed messages are p.ProtocolViolation; a wrong proof is ScramRefused."""

    def __init__(self, mechanism: str, info: AuthInfo, channel_binding: tuple[str, str] | None = None) -> None:
        self.info = info
        self._server = ScramMechanism(mechanism).make_server(lambda _name: info.as_tuple(),
                                                             channel_binding=channel_binding)

    def first(self, client_first: bytes) -> bytes:
        with _refusals():
            _set_client_first(self._server, _utf8(client_first))
            return self._server.get_server_first().encode()

    def final(self, client_final: bytes) -> tuple[bytes, ScramKeys]:
        text = _utf8(client_final)
        with _refusals():
            self._server.set_client_final(text)
            final = self._server.get_server_final()
        keys = recover_keys(self.info.stored_key, self.info.server_key,
                            self._server.client_first_bare, self._server.server_first, text)
        return final.encode(), keys


class _refusals:
    """scramp's exceptions as ScramRefused."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, ScramException):
            text = str(exc)
            raise ScramRefused(text, channel_binding="channel" in text.lower() or
                               "binding" in text.lower()) from None


def _set_client_first(server, client_first: str) -> None:
    """Postgres clients send an empty SCRAM user name (`n=,`): the user is the one in the
    startup packet. scramp insists on a non-empty name, so it parses a copy with a
    placeholder; the proof is then checked against the bare message the client really sent."""
    header_end = _nth_comma(client_first, 2)
    bare = client_first[header_end + 1:]
    if not bare.startswith("n=,"):
        server.set_client_first(client_first)
        return
    server.set_client_first(client_first[: header_end + 1] + "n=*," + bare[3:])
    server.client_first_bare = bare


def _nth_comma(text: str, n: int) -> int:
    index = -1
    for _ in range(n):
        index = text.find(",", index + 1)
        if index < 0:
            raise p.ProtocolViolation("malformed SCRAM client-first message")
    return index


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise p.ProtocolViolation("SCRAM message is not valid UTF-8") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ScramError("SCRAM proof has the wrong length")
    return bytes(x ^ y for x, y in zip(a, b))


def _attributes(message: str) -> dict[str, str]:
    out = {}
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise ScramError(f"malformed SCRAM message {message[:60]!r}")
        out.setdefault(key, value)
    return out


def recover_keys(stored_key: bytes, server_key: bytes, client_first_bare: str,
                 server_first: str, client_final: str) -> ScramKeys:
    """The ClientKey behind a client-final message whose proof was already verified."""
    without_proof, sep, proof = client_final.rpartition(",p=")
    if not sep:
        raise ScramError("client-final message has no proof")
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    client_key = _xor(base64.b64decode(proof), _hmac(stored_key, auth_message))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        raise ScramError("proof does not match the verifier")
    return ScramKeys(client_key, server_key)


class ScramClient:
    """One client exchange: `first()` -> client-first, `final(server_first)` -> client-final,
    `verify(server_final)` checks the server's signature (it must know the same verifier)."""

    def __init__(self, keys: ScramKeys, nonce: str | None = None) -> None:
        self.keys = keys
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._bare = f"n=,r={self.nonce}"  # Postgres takes the user from the startup packet
        self._auth_message: bytes | None = None

    def first(self) -> bytes:
        return (GS2_HEADER + self._bare).encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8", "replace")
        attrs = _attributes(text)
        nonce = attrs.get("r", "")
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce) or "s" not in attrs:
            raise ScramError("server-first message does not continue this exchange")
        without_proof = f"c={base64.b64encode(GS2_HEADER.encode()).decode()},r={nonce}"
        self._auth_message = f"{self._bare},{text},{without_proof}".encode()
        stored_key = hashlib.sha256(self.keys.client_key).digest()
        proof = _xor(self.keys.client_key, _hmac(stored_key, self._auth_message))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        if self._auth_message is None:
            raise ScramError("server-final before server-first")
        attrs = _attributes(server_final.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"server refused the proof: {attrs['e']}")
        expected = _hmac(self.keys.server_key, self._auth_message)
        if not hmac.compare_digest(base64.b64decode(attrs.get("v", "")), expected):
            raise ScramError("server signature does not match")
