"""SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (tls-server-end-point) with the client, done by the
gateway against the role's verifier from `pg_authid`, before any database is woken.
The SCRAM arithmetic is scramp's; this module maps it onto the wire and onto SQLSTATEs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from scramp import ScramException, ScramMechanism

from storage.roles import Role

from . import protocol as p
from .errors import INVALID_AUTHORIZATION, PROTOCOL_VIOLATION, AuthFailed, GatewayError
from .scram import ScramKeys, recover_keys

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
ITERATIONS = 4096
# keyed per gateway process: a mock salt is stable for a role name but reveals nothing
_MOCK_KEY = secrets.token_bytes(32)


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


def _mock_info(user: str) -> AuthInfo:
    """Stand-in credentials for a role that does not exist: the exchange runs to the end, so a
    client learns nothing from where it stops."""
    digest = hmac.new(_MOCK_KEY, user.encode(), hashlib.sha256).digest()
    return AuthInfo(digest[:16], secrets.token_bytes(32), secrets.token_bytes(32), ITERATIONS)


class Conversation:
    """The client side of authentication, as an async message source and sink."""

    async def next_event(self) -> p.Event:  # pragma: no cover - interface
        raise NotImplementedError

    def send(self, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError


async def authenticate(conn: Conversation, user: str, role: Role | None, *,
                       channel_binding_pem: str | None) -> ScramKeys:
    """Run SCRAM with the client; return once it has proven the password, raise otherwise.
    The result is the role's keys as the proof reveals them (gateway/scram.py): the gateway
    logs in to the instance with them, so Postgres checks the password too.

    `channel_binding_pem` is the server certificate when the connection is TLS, which enables
    SCRAM-SHA-256-PLUS and lets scramp refuse a downgrade."""
    info = parse_verifier(role.verifier) if role else None
    mechanisms = [SCRAM_PLUS, SCRAM] if channel_binding_pem else [SCRAM]
    conn.send(p.auth_sasl(mechanisms).encode())

    msg = await conn.next_event()
    if not isinstance(msg, p.Message):
        raise p.ProtocolViolation("expected a SASLInitialResponse")
    initial = p.decode_sasl_initial(msg)
    if initial.mechanism not in mechanisms:
        raise GatewayError(PROTOCOL_VIOLATION,
                           f"client selected an invalid SASL authentication mechanism {initial.mechanism[:40]!r}")
    if initial.data is None:
        raise p.ProtocolViolation("SASLInitialResponse carries no data")
    cb = ("tls-server-end-point", channel_binding_pem) if channel_binding_pem else None
    used = info or _mock_info(user)
    server = ScramMechanism(initial.mechanism).make_server(lambda _name: used.as_tuple(), channel_binding=cb)
    try:
        _set_client_first(server, _utf8(initial.data))
        conn.send(p.Authentication(p.AUTH_SASL_CONTINUE, server.get_server_first().encode()).encode())
        msg = await conn.next_event()
        if not isinstance(msg, p.Message):
            raise p.ProtocolViolation("expected a SASLResponse")
        client_final = _utf8(p.decode_sasl_response(msg))
        server.set_client_final(client_final)
        final = server.get_server_final()
    except ScramException as e:
        if role is None:  # as Postgres: an unknown role reads exactly like a wrong password
            raise AuthFailed(user, "unknown_role") from None
        if "channel" in str(e).lower() or "binding" in str(e).lower():
            raise GatewayError(PROTOCOL_VIOLATION, f"SCRAM channel binding check failed: {e}") from None
        raise AuthFailed(user) from None
    if role is None:
        raise AuthFailed(user, "unknown_role")
    if info is None or role.expired():
        # no usable SCRAM verifier (no password, or MD5) or an expired one: never a way in
        raise AuthFailed(user)
    if not role.can_login:
        raise GatewayError(INVALID_AUTHORIZATION, f'role "{user}" is not permitted to log in')
    keys = recover_keys(info.stored_key, info.server_key, server.client_first_bare,
                        server.server_first, client_final)
    conn.send(p.Authentication(p.AUTH_SASL_FINAL, final.encode()).encode())
    return keys


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
