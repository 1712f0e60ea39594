"""Remote routes as configured: database ids served by an existing external Postgres
(host:port and TLS options) instead of a local instance, parsed and checked at load."""

from __future__ import annotations

import functools
import json
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from storage.ids import ID_RULE, valid_id

SSLMODES = ("disable", "require", "verify-ca", "verify-full")
# password: the gateway asks the client for its password (inside the client's TLS) and logs in
# to the remote itself; passthrough: the remote's SASL exchange is relayed to the client as is
AUTH_MODES = ("password", "passthrough")
ALPN = "postgresql"


@dataclass(frozen=True)
class RemoteRoute:
    host: str
    port: int = 5432
    sslmode: str = "verify-full"
    sslrootcert: str = ""
    server_name: str = ""  # the TLS name sent (SNI) and verified; empty: host
    auth: str = "password"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def tls_name(self) -> str:
        return self.server_name or self.host

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client-side context for this route (None for sslmode=disable), made once."""
        if self.sslmode == "disable":
            return None
        return _client_context(self.sslmode, self.sslrootcert)


@functools.lru_cache(maxsize=128)
def _client_context(sslmode: str, sslrootcert: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN])
    ctx.check_hostname = sslmode == "verify-full"
    if sslmode == "require" and not sslrootcert:
        ctx.verify_mode = ssl.CERT_NONE  # libpq's require: encrypted, not authenticated
        return ctx
    # like libpq, require with a root certificate also verifies the chain
    ctx.verify_mode = ssl.CERT_REQUIRED
    if sslrootcert:
        ctx.load_verify_locations(cafile=sslrootcert)
    else:
        ctx.load_default_certs()
    return ctx


_KEYS = tuple(f.name for f in fields(RemoteRoute))


def parse_routes(raw: Any) -> dict[str, RemoteRoute]:
    """`{id: {host, port, sslmode, sslrootcert, server_name, auth}}` (a TOML table, or JSON text
    from the environment) into checked routes. Raises ValueError naming the entry and key."""
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"remote_routes: not a JSON object ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError("remote_routes: expected a table of database id -> "
                         "{host, port, sslmode, ...}")
    routes = {}
    for db_id, entry in raw.items():
        if not isinstance(db_id, str) or not valid_id(db_id):
            raise ValueError(f"remote_routes: {db_id!r} is not a valid database id ({ID_RULE})")
        routes[db_id] = entry if isinstance(entry, RemoteRoute) else _parse_route(db_id, entry)
    return routes


def _parse_route(db_id: str, entry: Any) -> RemoteRoute:
    where = f"remote_routes.{db_id}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table with host, port, sslmode, ...")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    values = {k: entry[k] for k in _KEYS if k in entry}
    for key in ("host", "sslmode", "sslrootcert", "server_name", "auth"):
        if key in values and not isinstance(values[key], str):
            raise ValueError(f"{where}.{key}: expected a string, got {values[key]!r}")
    host = values.get("host", "").strip()
    if not host:
        raise ValueError(f"{where}.host is required (the remote server's name or address)")
    if any(ch.isspace() for ch in host) or "/" in host:
        raise ValueError(f"{where}.host: {host!r} is not a host name or address "
                         "(unix sockets are not supported)")
    values["host"] = host
    values["port"] = _port(where, values.get("port", 5432))
    route = RemoteRoute(**values)
    if route.sslmode not in SSLMODES:
        raise ValueError(f"{where}.sslmode: {route.sslmode!r} is not one of {', '.join(SSLMODES)}")
    if route.auth not in AUTH_MODES:
        raise ValueError(f"{where}.auth: {route.auth!r} is not one of {', '.join(AUTH_MODES)}")
    if route.sslmode == "disable":
        for key in ("sslrootcert", "server_name"):
            if getattr(route, key):
                raise ValueError(f"{where}.{key} has no effect with sslmode=disable; "
                                 "remove it or choose require, verify-ca or verify-full")
    if route.sslrootcert:
        _check_rootcert(where, route)
    return route


def _port(where: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"{where}.port: {raw!r} is not a TCP port")
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{where}.port: {raw!r} is not a TCP port") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{where}.port: {port} is not a TCP port (1-65535)")
    return port


def _check_rootcert(where: str, route: RemoteRoute) -> None:
    path = Path(route.sslrootcert)
    if not path.is_file():
        raise ValueError(f"{where}.sslrootcert: {route.sslrootcert} does not exist")
    try:
        _client_context(route.sslmode, route.sslrootcert)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ValueError(f"{where}.sslrootcert: {route.sslrootcert} holds no usable PEM CA "
                         f"certificate ({e})") from None
