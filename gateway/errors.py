"""User-facing errors: each carries a SQLSTATE and a text that tells the user what to do next.

Anything raised as `GatewayError` reaches the client as an ErrorResponse before the
connection closes; it never becomes a silent disconnect.
"""

from __future__ import annotations

from gateway.wire.protocol import ErrorResponse

# SQLSTATEs used by the gateway (see Postgres' errcodes.txt).
PROTOCOL_VIOLATION = "08P01"
CONNECTION_REJECTED = "08004"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
UNKNOWN_DATABASE = "3D000"
TOO_MANY_CONNECTIONS = "53300"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
FEATURE_NOT_SUPPORTED = "0A000"
INTERNAL_ERROR = "XX000"
DATA_CORRUPTED = "XX001"
DISK_FULL = "53100"


class GatewayError(Exception):
    def __init__(self, code: str, message: str, *, hint: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.detail = detail

    def response(self) -> ErrorResponse:
        return ErrorResponse(self.code, self.message, hint=self.hint, detail=self.detail)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class AuthFailed(GatewayError):
    """A refused login whose text is Postgres' own and tells the client nothing more (28P01
    `password authentication failed for user "x"`, whatever the cause); `reason` is for the
    gateway's metrics and log only (password, unknown_role)."""

    def __init__(self, user: str, reason: str = "password") -> None:
        super().__init__(INVALID_PASSWORD, f'password authentication failed for user "{user}"')
        self.reason = reason


def unknown_database(db_id: str) -> GatewayError:
    return GatewayError(UNKNOWN_DATABASE, f'database "{db_id}" does not exist',
                        hint="Check the host name; create it with `pgsni db create ID`.")


def known_elsewhere(db_id: str) -> GatewayError:
    return GatewayError(
        CANNOT_CONNECT_NOW, f'database "{db_id}" has no saved version, but storage holds a lease '
        "or other objects under its name", detail="Another gateway may have created it and hold "
        "changes it has not saved yet; it is not created again here.",
        hint="Retry once that gateway has saved it, or ask the operator (`pgsni db info ID`).")


def not_secured(db_id: str) -> GatewayError:
    return GatewayError(
        INVALID_AUTHORIZATION,
        f'database "{db_id}" was saved by an older pgsni whose clients logged in as a superuser; '
        "it is not served until its roles are secured",
        hint=f"The operator runs `pgsni db secure {db_id}` (docs/cli.md); no data is lost.")


def superuser_refused(user: str) -> GatewayError:
    return GatewayError(
        INVALID_AUTHORIZATION, f'role "{user}" is a superuser; this gateway does not let clients '
        "log in as superusers",
        hint="Log in as a role without SUPERUSER; the operator can allow superusers with the "
             "setting allow_superuser_login (SECURITY.md).")


def tls_required() -> GatewayError:
    return GatewayError(
        INVALID_AUTHORIZATION, "this gateway requires TLS; the connection was not encrypted",
        hint="Connect with sslmode=require (or verify-full).")


def too_many_instances(limit: int) -> GatewayError:
    return GatewayError(
        TOO_MANY_CONNECTIONS,
        f"too many databases are active on this gateway (limit {limit}) and none is idle",
        hint="Try again shortly, when another database has gone idle.")


def startup_failed(db_id: str, reason: str) -> GatewayError:
    return GatewayError(CANNOT_CONNECT_NOW, f'database "{db_id}" could not be started',
                        detail=reason, hint="Try again; if it persists, ask the operator to check the gateway log.")


def shutting_down() -> GatewayError:
    return GatewayError(ADMIN_SHUTDOWN, "the gateway is shutting down",
                        hint="Reconnect in a moment.")


def disk_full(db_id: str, reason: str) -> GatewayError:
    return GatewayError(DISK_FULL, f'the gateway has no disk space left for database "{db_id}"',
                        detail=reason, hint="Try again later; the operator must free space on the data root.")


def storage_unavailable(db_id: str, detail: str | None = None) -> GatewayError:
    return GatewayError(CANNOT_CONNECT_NOW, f'the storage holding database "{db_id}" is unavailable',
                        detail=detail, hint="Try again shortly; no data was lost.")


def too_many_connections_from(ip: str, limit: int) -> GatewayError:
    return GatewayError(TOO_MANY_CONNECTIONS, f"too many connections from {ip} (limit {limit})",
                        hint="Close idle connections or use a connection pool.")


def too_many_connections_to(db_id: str, limit: int) -> GatewayError:
    return GatewayError(TOO_MANY_CONNECTIONS, f'too many connections to database "{db_id}" (limit {limit})',
                        hint="Close idle connections or use a connection pool.")


def gateway_full(limit: int) -> GatewayError:
    return GatewayError(TOO_MANY_CONNECTIONS, f"the gateway is at its connection limit ({limit})",
                        hint="Try again shortly.")


def too_many_starting() -> GatewayError:
    return GatewayError(TOO_MANY_CONNECTIONS, "too many databases are starting; try again",
                        hint="Retry in a few seconds.")


def too_many_auth_failures() -> GatewayError:
    return GatewayError(INVALID_AUTHORIZATION, "too many failed authentication attempts; try again later",
                        hint="Failed logins are limited per client address and per database, per minute.")
