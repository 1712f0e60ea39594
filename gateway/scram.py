"""SCRAM-SHA-256 keys, sans IO: what a client's verified proof reveals (its ClientKey), and a
client conversation that logs in with that key instead of a password.

The gateway checks a client's password itself (gateway/auth.py); the instance then checks it
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
