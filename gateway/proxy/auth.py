"""SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (tls-server-end-point) with the client, done by the
gateway against the role's verifier from `pg_authid`, before any database is woken. The
conversation itself is gateway/wire/scram.py's; this module drives it over the connection
and maps its outcome onto SQLSTATEs."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from gateway.errors import INVALID_AUTHORIZATION, PROTOCOL_VIOLATION, AuthFailed, GatewayError
from gateway.wire import protocol as p
from gateway.wire.scram import (
    ITERATIONS, SCRAM, SCRAM_PLUS, AuthInfo, ScramKeys, ScramRefused, ScramServer, parse_verifier)
from storage.roles import Role

# for a database with no secret to key mock salts by (see mock_secret): per gateway process
_MOCK_KEY = secrets.token_bytes(32)


def mock_secret(db_id: str, tenant: Role | None) -> bytes | None:
    """What keys the mock salts of `db_id`'s roles that do not exist: its tenant role's SCRAM
    verifier, a secret every gateway, worker and restart reading that database shares (as
    Postgres keys them by a nonce made at initdb), so asking again elsewhere or later gets the
    same salt, as for a role that exists. None without one."""
    if tenant is None or not tenant.verifier:
        return None
    return hashlib.sha256(b"pgsni mock salt\0" + db_id.encode() + b"\0" + tenant.verifier.encode()).digest()


def _mock_info(user: str, secret: bytes | None) -> AuthInfo:
    """Stand-in credentials for a role that does not exist: the exchange runs to the end, so a
    client learns nothing from where it stops."""
    digest = hmac.new(secret or _MOCK_KEY, user.encode(), hashlib.sha256).digest()
    return AuthInfo(digest[:16], secrets.token_bytes(32), secrets.token_bytes(32), ITERATIONS)


class Conversation:
    """The client side of authentication, as an async message source and sink."""

    async def next_event(self) -> p.Event:  # pragma: no cover - interface
        raise NotImplementedError

    def send(self, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError


async def authenticate(conn: Conversation, user: str, role: Role | None, *,
                       channel_binding_pem: str | None, mock: bytes | None = None) -> ScramKeys:
    """Run SCRAM with the client; return once it has proven the password, raise otherwise.
    The result is the role's keys as the proof reveals them (gateway/wire/scram.py): the gateway
    logs in to the instance with them, so Postgres checks the password too.

    `channel_binding_pem` is the server certificate when the connection is TLS, which enables
    SCRAM-SHA-256-PLUS and lets scramp refuse a downgrade. `mock`: the database's
    `mock_secret`, for a role that does not exist."""
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
    server = ScramServer(initial.mechanism, info or _mock_info(user, mock), cb)
    try:
        conn.send(p.Authentication(p.AUTH_SASL_CONTINUE, server.first(initial.data)).encode())
        msg = await conn.next_event()
        if not isinstance(msg, p.Message):
            raise p.ProtocolViolation("expected a SASLResponse")
        final, keys = server.final(p.decode_sasl_response(msg))
    except ScramRefused as e:
        if e.channel_binding:  # before the password is looked at: the same for every role
            raise GatewayError(PROTOCOL_VIOLATION, f"SCRAM channel binding check failed: {e}") from None
        if role is None:  # as Postgres: an unknown role reads exactly like a wrong password
            raise AuthFailed(user, "unknown_role") from None
        raise AuthFailed(user) from None
    if role is None:
        raise AuthFailed(user, "unknown_role")
    if info is None or role.expired():
        # no usable SCRAM verifier (no password, or MD5) or an expired one: never a way in
        raise AuthFailed(user)
    if not role.can_login:
        raise GatewayError(INVALID_AUTHORIZATION, f'role "{user}" is not permitted to log in')
    conn.send(p.Authentication(p.AUTH_SASL_FINAL, final).encode())
    return keys
