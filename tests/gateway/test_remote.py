"""Unit tests for remote routes: the SASL mechanism filtering of auth=passthrough, and the
remote_routes setting as loaded from TOML and the environment, with its errors, and how a
relayed remote stream tells that its client is waiting (where a shutdown may add a message)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from gateway.wire import protocol as p
from gateway.config import ConfigError, load
from gateway.errors import GatewayError
from gateway.proxy.remote import RemoteConnection, sasl_mechanisms, without_channel_binding
from gateway.remote_routes import RemoteRoute, parse_routes

PLUS, PLAIN = "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"


# --- where the relayed stream rests ------------------------------------------------------------


def _rest_after(*chunks: bytes) -> bool:
    async def feed():
        conn = RemoteConnection(p.MessageReader(startup=False))
        for chunk in chunks:
            conn.data_received(chunk)
        return conn.at_rest
    return asyncio.run(feed())


READY = {status: p.Message(b"Z", status).encode() for status in (b"I", b"T", b"E")}
ROW = p.Message(b"D", b"\0\1\0\0\0\1x").encode()


def test_at_rest_after_a_reply_ending_in_ready_for_query():
    for ready in READY.values():
        assert _rest_after(ROW + p.Message(b"C", b"SELECT 1\0").encode() + ready)
        assert _rest_after(ROW, ready)
    assert not _rest_after()  # nothing yet


def test_not_at_rest_in_the_middle_of_a_reply():
    assert not _rest_after(READY[b"I"], ROW)  # a new reply began
    assert not _rest_after(READY[b"I"] + ROW[:3])
    assert not _rest_after(ROW + READY[b"I"][:3], READY[b"I"][3:])  # split: not trusted
    assert not _rest_after(p.Message(b"Z", b"X").encode())  # not a transaction status
    assert not _rest_after(p.Message(b"Z", b"II").encode())  # length 6: not ReadyForQuery


# --- SASL mechanism filtering ---------------------------------------------------------------


def test_sasl_mechanisms_parses_the_list():
    assert sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0") == [PLUS, PLAIN]
    assert sasl_mechanisms(b"SCRAM-SHA-256\0\0") == [PLAIN]


def test_without_channel_binding_strips_plus_and_keeps_the_rest():
    request = p.auth_sasl([PLUS, PLAIN])
    out = without_channel_binding(request)
    assert out.code == p.AUTH_SASL
    assert out.encode() == p.auth_sasl([PLAIN]).encode()
    assert sasl_mechanisms(out.data) == [PLAIN]


def test_without_channel_binding_keeps_order_and_unknown_mechanisms():
    out = without_channel_binding(p.auth_sasl(["X-FUTURE", PLUS, PLAIN, "OTHER-PLUS"]))
    assert sasl_mechanisms(out.data) == ["X-FUTURE", PLAIN]


def test_without_channel_binding_is_a_no_op_without_plus():
    request = p.auth_sasl([PLAIN])
    assert without_channel_binding(request).encode() == request.encode()


def test_only_plus_offered_is_refused_with_a_hint():
    with pytest.raises(GatewayError) as info:
        without_channel_binding(p.auth_sasl([PLUS]))
    assert info.value.code == "0A000" and 'auth = "password"' in info.value.hint


def test_unterminated_mechanism_list_is_a_protocol_violation():
    with pytest.raises(p.ProtocolViolation):
        sasl_mechanisms(b"SCRAM-SHA-256")


def test_decoded_from_the_wire_and_filtered():
    wire = p.auth_sasl([PLUS, PLAIN]).encode()
    reader = p.MessageReader(startup=False)
    reader.receive_data(wire)
    event = p.decode_backend(reader.next_event())
    assert isinstance(event, p.Authentication)
    assert sasl_mechanisms(without_channel_binding(event).data) == [PLAIN]


# --- the remote_routes setting ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgsni.toml"
    path.write_text(text)
    return path


def test_routes_from_toml_with_defaults(tmp_path, ca_file):
    s = load(toml(tmp_path, f"""
[remote_routes.ext1]
host = "pg.internal"
port = 6543
sslmode = "verify-full"
sslrootcert = "{ca_file}"
server_name = "pg.example.org"

[remote_routes.legacy]
host = "10.0.0.5"
sslmode = "disable"
auth = "passthrough"
"""), env={})
    assert s.remote_routes["ext1"] == RemoteRoute("pg.internal", 6543, "verify-full", str(ca_file),
                                                   "pg.example.org", "password")
    legacy = s.remote_routes["legacy"]
    assert (legacy.port, legacy.sslmode, legacy.auth, legacy.tls_name) == (5432, "disable", "passthrough", "10.0.0.5")
    assert legacy.ssl_context() is None


def test_default_is_verify_full_and_password():
    route = parse_routes({"ext1": {"host": "pg.internal"}})["ext1"]
    assert (route.sslmode, route.auth, route.port) == ("verify-full", "password", 5432)
    ctx = route.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_ssl_contexts_follow_sslmode(ca_file):
    require = RemoteRoute("h", sslmode="require").ssl_context()
    assert require.verify_mode == ssl.CERT_NONE and not require.check_hostname
    require_ca = RemoteRoute("h", sslmode="require", sslrootcert=str(ca_file)).ssl_context()
    assert require_ca.verify_mode == ssl.CERT_REQUIRED and not require_ca.check_hostname
    verify_ca = RemoteRoute("h", sslmode="verify-ca", sslrootcert=str(ca_file)).ssl_context()
    assert verify_ca.verify_mode == ssl.CERT_REQUIRED and not verify_ca.check_hostname


def test_routes_from_the_environment_as_json():
    s = load(env={"PGSNI_REMOTE_ROUTES": '{"ext1": {"host": "pg", "port": 5433, "sslmode": "require"}}'})
    assert s.remote_routes["ext1"].port == 5433
    assert load(env={"PGSNI_REMOTE_ROUTES": ""}).remote_routes == {}


def test_bad_json_in_the_environment_names_the_variable():
    with pytest.raises(ConfigError, match="PGSNI_REMOTE_ROUTES: remote_routes: not a JSON object"):
        load(env={"PGSNI_REMOTE_ROUTES": "{nope"})


@pytest.mark.parametrize("entry, message", [
    ({}, r"remote_routes\.ext1\.host is required"),
    ({"host": "  "}, r"remote_routes\.ext1\.host is required"),
    ({"host": "/var/run/postgresql"}, "unix sockets are not supported"),
    ({"host": "h", "port": 0}, r"remote_routes\.ext1\.port: 0 is not a TCP port"),
    ({"host": "h", "port": 70000}, "is not a TCP port"),
    ({"host": "h", "port": "x"}, r"remote_routes\.ext1\.port: 'x' is not a TCP port"),
    ({"host": "h", "port": True}, "is not a TCP port"),
    ({"host": "h", "sslmode": "prefer"}, r"sslmode: 'prefer' is not one of disable, require, verify-ca, verify-full"),
    ({"host": "h", "auth": "trust"}, r"auth: 'trust' is not one of password, passthrough"),
    ({"host": "h", "password": "x"}, r"unknown key 'password' \(known: host, port, sslmode"),
    ({"host": "h", "sslmode": "disable", "server_name": "n"}, "server_name has no effect with sslmode=disable"),
    ({"host": "h", "sslrootcert": "/nonexistent/ca.pem"}, r"sslrootcert: /nonexistent/ca.pem does not exist"),
    ({"host": 5}, r"host: expected a string"),
    ("pg.internal:5432", r"remote_routes\.ext1: expected a table"),
])
def test_invalid_routes_are_refused_with_a_clear_message(entry, message):
    with pytest.raises(ConfigError, match=message):
        load(env={}, remote_routes={"ext1": entry})


def test_invalid_database_id_is_refused():
    with pytest.raises(ConfigError, match=r"remote_routes: 'Bad_Id' is not a valid database id"):
        load(env={}, remote_routes={"Bad_Id": {"host": "h"}})


def test_sslrootcert_that_is_not_a_certificate(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no usable PEM CA certificate"):
        load(env={}, remote_routes={"ext1": {"host": "h", "sslrootcert": str(junk)}})


def test_errors_in_the_file_name_the_file(tmp_path):
    path = toml(tmp_path, '[remote_routes.ext1]\nhost = "h"\nsslmode = "bogus"\n')
    with pytest.raises(ConfigError, match=rf"{path}: remote_routes\.ext1\.sslmode"):
        load(path, env={})


def test_remote_connect_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="remote_connect_timeout must be positive"):
        load(env={}, remote_connect_timeout=0)
