"""No authentication path skips SCRAM. On every route (SSLRequest or direct TLS, SNI or
`options=endpoint=`, both, and plain TCP when TLS is not required) the gateway's first
authentication request is AuthenticationSASL offering only SCRAM-SHA-256(-PLUS); it never
asks for a cleartext or MD5 password and never sends AuthenticationOk before the client has
proven its password. Cleartext passwords are not supported at all. Behind the gateway,
instances accept connections only on their private socket, even after a tenant superuser
tries to open TCP with ALTER SYSTEM."""

from __future__ import annotations

import psycopg
import pytest

from gateway.wire import protocol as p

from ..support.harness import DOMAIN, TEST_PASSWORD, conninfo, psql
from ..support.rawclient import RawClient

SCRAM_ONLY = {"SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"}
ROUTES = {
    "sslrequest+sni": dict(request=True, sni=True, options=None),
    "direct-tls+sni": dict(request=False, sni=True, options=None),
    "sslrequest+endpoint": dict(request=True, sni=False, options="endpoint=app1"),
    "direct-tls+endpoint": dict(request=False, sni=False, options="endpoint=app1"),
    "sni+endpoint": dict(request=True, sni=True, options="endpoint=app1"),
}


def _open(port: int, ca, route: dict, user: str = "postgres") -> RawClient:
    rc = RawClient(port)
    rc.start_tls(str(ca), f"app1.{DOMAIN}" if route["sni"] else None, request=route["request"],
                 alpn=None if route["request"] else ["postgresql"])
    params = {"user": user, "database": "postgres"}
    if route["options"]:
        params["options"] = route["options"]
    rc.startup(params)
    return rc


def _first_auth(rc: RawClient) -> p.Authentication:
    event = rc.next_backend()
    assert isinstance(event, p.Authentication), event
    assert event.code == p.AUTH_SASL, f"first authentication request is code {event.code}, not SASL"
    mechanisms = set(event.data.rstrip(b"\0").split(b"\0"))
    assert {m.decode() for m in mechanisms} <= SCRAM_ONLY and mechanisms, mechanisms
    return event


def _rest(rc: RawClient) -> list:
    """Backend events up to ReadyForQuery, an ErrorResponse, or the connection's end."""
    events = []
    while True:
        try:
            event = rc.next_backend()
        except (ConnectionError, OSError):
            return events
        events.append(event)
        if isinstance(event, (p.ReadyForQuery, p.ErrorResponse)) and not getattr(event, "notice", False):
            return events


def _auth_codes(events) -> list[int]:
    return [e.code for e in events if isinstance(e, p.Authentication)]


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_offers_only_scram_and_ok_only_after_proof(gateway, tls, route):
    gateway.create_db("app1")
    r = ROUTES[route]
    # the right password: SASLFinal, then AuthenticationOk, then the session
    rc = _open(gateway.port, tls["ca"], r)
    rc.scram(auth=_first_auth(rc), user="postgres", password=TEST_PASSWORD)
    events = _rest(rc)
    rc.close()
    assert _auth_codes(events) == [p.AUTH_SASL_FINAL, p.AUTH_OK], events
    assert isinstance(events[-1], p.ReadyForQuery)
    # a wrong password: an error, never AuthenticationOk
    rc = _open(gateway.port, tls["ca"], r)
    rc.scram(auth=_first_auth(rc), user="postgres", password="wrong-" + TEST_PASSWORD)
    events = _rest(rc)
    rc.close()
    assert p.AUTH_OK not in _auth_codes(events)
    assert isinstance(events[-1], p.ErrorResponse) and events[-1].code == "28P01", events
    # an unknown role is offered SCRAM too (a mock exchange), and refused as a wrong password
    rc = _open(gateway.port, tls["ca"], r, user="nobody")
    rc.scram(auth=_first_auth(rc), user="nobody", password=TEST_PASSWORD)
    events = _rest(rc)
    rc.close()
    assert p.AUTH_OK not in _auth_codes(events)
    assert isinstance(events[-1], p.ErrorResponse) and events[-1].code == "28P01", events


def test_a_cleartext_password_message_is_refused(gateway, tls):
    gateway.create_db("app1")
    rc = _open(gateway.port, tls["ca"], ROUTES["sslrequest+sni"])
    _first_auth(rc)
    rc.send(p.Message(b"p", TEST_PASSWORD.encode() + b"\0").encode())  # a PasswordMessage
    events = _rest(rc)
    rc.close()
    assert p.AUTH_OK not in _auth_codes(events)
    assert isinstance(events[-1], p.ErrorResponse) and events[-1].code == "08P01", events


def test_plain_tcp_when_tls_is_optional_still_requires_scram(start_gateway):
    gw = start_gateway(require_tls=False)
    gw.create_db("app1")
    rc = RawClient(gw.port)
    rc.startup({"user": "postgres", "database": "postgres", "options": "endpoint=app1"})
    auth = _first_auth(rc)
    assert b"PLUS" not in auth.data  # no channel binding without TLS
    rc.scram("postgres", TEST_PASSWORD, auth=auth)
    assert _auth_codes(_rest(rc)) == [p.AUTH_SASL_FINAL, p.AUTH_OK]
    rc.close()


@pytest.mark.parametrize("method", ["password", "md5", "none"])
def test_libpq_require_auth_other_than_scram_is_never_satisfied(gateway, tls, method):
    """libpq's own check (require_auth, libpq >= 16): the server never offers anything else."""
    gateway.create_db("app1")
    if psycopg.pq.version() < 160000:
        pytest.skip(f"libpq {psycopg.pq.version()} has no require_auth")
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", require_auth=method)).close()
    assert "SASL" in str(e.value)
    psycopg.connect(conninfo(gateway.port, tls["ca"], "app1", require_auth="scram-sha-256")).close()


def test_instances_listen_only_on_their_private_socket(gateway, tls):
    gateway.create_db("app1")
    dsn = conninfo(gateway.port, tls["ca"], "app1")
    rules = gateway.admin_sql("app1", "select type, user_name, auth_method from pg_hba_file_rules "
                                      "order by line_number")
    assert rules == [("local", ["pgsni_admin", "pgsni_agent"], "peer"),
                     ("local", ["pgsni_admin"], "peer"),  # replication: the WAL shipper's
                     ("local", ["all"], "scram-sha-256")]
    # what a superuser may have left in postgresql.auto.conf (an archive, or a tenant from when
    # tenants were superusers): TCP, a wide socket, a program run for every WAL segment
    for sql in ("alter system set listen_addresses = '*'",
                "alter system set unix_socket_permissions = '0777'",
                "alter system set archive_mode = on",
                "alter system set archive_command = 'touch /tmp/pgsni-archived'"):
        gateway.admin_sql("app1", sql)
    gateway.call(lambda: gateway.gw.instances.stop("app1"))
    shown = psql(dsn, "show listen_addresses; show unix_socket_permissions; show archive_mode; "
                      "show archive_command")
    assert shown.returncode == 0 and shown.stdout.split() == ["0700", "off", "(disabled)"], shown.stdout
    sock = gateway.settings.socket_path / "app1" / ".s.PGSQL.5432"
    assert oct(sock.stat().st_mode & 0o777) == "0o700"
