"""Route a connection to a database id: from the TLS SNI name `<id>.<domain>`, or from the
startup option `endpoint=<id>` for clients that send no SNI. Invalid ids are refused here,
before any work is done."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import CONNECTION_REJECTED, UNKNOWN_DATABASE, GatewayError
from storage.ids import ID_RULE, valid_id

_ENDPOINT = "endpoint="


@dataclass(frozen=True)
class Route:
    db_id: str
    method: str  # "sni" or "options"


def check_id(db_id: str) -> str:
    if not valid_id(db_id):
        raise GatewayError(
            UNKNOWN_DATABASE, f"invalid database id {db_id[:80]!r}",
            hint=f"A database id is {ID_RULE}.")
    return db_id


def id_from_sni(server_name: str, domains: list[str]) -> str:
    db_id = _sni_label(server_name, domains)
    if db_id is None:
        raise GatewayError(
            CONNECTION_REJECTED, f"server name {server_name[:120]!r} is not served by this gateway",
            hint="Use <id>." + " or <id>.".join(domains) + " as the host name, or name the "
                 "database with options=endpoint=<id>.")
    return db_id


def _sni_label(server_name: str, domains: list[str]) -> str | None:
    """The id in `<id>.<domain>`; None when the name is under none of the domains. DNS names
    are case-insensitive: ABC.DB.EXAMPLE.COM is database abc."""
    name = server_name.lower()
    # longest first: with nested domains (example.com and db.example.com) the most specific wins
    for domain in sorted(domains, key=len, reverse=True):
        suffix = "." + domain.lower()
        if name.endswith(suffix):
            label = name[: -len(suffix)]
            if "." in label:
                raise GatewayError(
                    UNKNOWN_DATABASE, f"server name {server_name[:120]!r} has more than one label "
                    f"before {domain!r}", hint=f"Use <id>.{domain} as the host name.")
            return check_id(label)
    return None


def split_options(options: str) -> tuple[str | None, str]:
    """Take `endpoint=<id>` out of a startup `options` string; return (id, remaining options).

    Options are whitespace-separated; a backslash escapes the next character, as in Postgres.
    """
    tokens, current, escaped = [], [], False
    for ch in options:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        tokens.append("".join(current))
    endpoint: str | None = None
    rest = []
    for token in tokens:
        if token.startswith(_ENDPOINT):
            value = token[len(_ENDPOINT):]
            if endpoint is not None and value != endpoint:
                raise GatewayError(CONNECTION_REJECTED, "options name two different endpoints")
            endpoint = value
        else:
            rest.append(token)
    return endpoint, " ".join(rest)


def route(server_name: str | None, options: str | None, domains: list[str]) -> tuple[Route, str]:
    """Pick the database for a connection. Returns the route and the options left for Postgres."""
    endpoint, rest = split_options(options or "")
    sni_id = None
    if server_name:
        # a name outside our domains (localhost, a CNAME) is fine when options name the database
        sni_id = _sni_label(server_name, domains) if endpoint is not None else id_from_sni(server_name, domains)
    if endpoint is not None:
        check_id(endpoint)
        if sni_id is not None and sni_id != endpoint:
            raise GatewayError(
                CONNECTION_REJECTED,
                f"the server name names database {sni_id!r} but options name {endpoint!r}",
                hint="Drop endpoint= from options, or make it match the host name.")
    if sni_id is not None:
        return Route(sni_id, "sni"), rest
    if endpoint is not None:
        return Route(endpoint, "options"), rest
    example = f"<id>.{domains[0]}" if domains else "<id>.<domain>"
    raise GatewayError(
        CONNECTION_REJECTED,
        "no database id: the client sent no TLS server name (SNI) and no endpoint option",
        hint=f"Connect to host {example} with sslmode=require, or, if your client cannot send "
             "SNI (connecting by IP address, old drivers), add options=endpoint=<id> to the "
             "connection string (in a URL: ?options=endpoint%3D<id>).")
