"""Unit tests for gateway/proxy/auth.py: SCRAM against a fake client conversation (no sockets).

The client is scramp's ScramClient, tweaked to behave like libpq: libpq sends an EMPTY
user name in its client-first message (`n,,n=,r=...`) because the user is the one in the
startup packet. The proof is computed over the bare message actually sent.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from scramp import ScramClient

from gateway.wire import protocol as p
from gateway.proxy.auth import Conversation, authenticate
from gateway.wire.scram import SCRAM, SCRAM_PLUS, AuthInfo, parse_verifier, scram_verifier
from gateway.errors import INVALID_AUTHORIZATION, INVALID_PASSWORD, PROTOCOL_VIOLATION, GatewayError
from storage.roles import Role

USER = "alice"
PASSWORD = "correct horse battery staple"
ITER = 4096

# one verifier for the whole module: deriving it is the slow part
VERIFIER = scram_verifier(PASSWORD, ITER)


# --- parse_verifier -----------------------------------------------------------------------------


def test_scram_verifier_format():
    mech, rest = VERIFIER.split("$", 1)
    assert mech == "SCRAM-SHA-256"
    head, keys = rest.split("$")
    iterations, salt = head.split(":")
    assert iterations == str(ITER)
    assert len(base64.b64decode(salt)) >= 16
    stored, server = keys.split(":")
    assert len(base64.b64decode(stored)) == 32 and len(base64.b64decode(server)) == 32


def test_scram_verifier_salts_differ():
    assert scram_verifier("pw", 4096) != scram_verifier("pw", 4096)


def test_parse_verifier_on_scram_verifier():
    info = parse_verifier(VERIFIER)
    assert isinstance(info, AuthInfo)
    _mech, rest = VERIFIER.split("$", 1)
    head, keys = rest.split("$")
    salt = head.split(":")[1]
    stored, server = keys.split(":")
    assert info.iterations == ITER
    assert info.salt == base64.b64decode(salt)
    assert info.stored_key == base64.b64decode(stored)
    assert info.server_key == base64.b64decode(server)
    assert info.as_tuple() == (info.salt, info.stored_key, info.server_key, ITER)


def test_parse_verifier_matches_password():
    # StoredKey = H(HMAC(SaltedPassword, "Client Key")), per RFC 5802
    import hmac
    info = parse_verifier(VERIFIER)
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), info.salt, info.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert hashlib.sha256(client_key).digest() == info.stored_key
    assert hmac.new(salted, b"Server Key", hashlib.sha256).digest() == info.server_key


@pytest.mark.parametrize("verifier", [
    None,
    "",
    "garbage",
    "md5" + "0" * 32,
    "md53175bce1d3201d16594cebf9d7eb3f9d",
    "SCRAM-SHA-256$4096:c2FsdA==",                            # no keys
    "SCRAM-SHA-256$abc:c2FsdA==$c3RvcmVk:c2VydmVy",           # iterations not a number
    "SCRAM-SHA-256$4096:not base64!$c3RvcmVk:c2VydmVy",       # salt not base64
    "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk",                   # one key only
    "SCRAM-SHA-1$4096:c2FsdA==$c3RvcmVk:c2VydmVy",            # another mechanism
    "$$",
])
def test_parse_verifier_refuses(verifier):
    assert parse_verifier(verifier) is None


# --- a fake client conversation -------------------------------------------------------------------


class FakeConversation(Conversation):
    """Events the gateway reads come from `inbox`; what it sends lands in `sent` and `outbox`."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[bytes] = []

    async def next_event(self) -> p.Event:
        return await self.inbox.get()

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.outbox.put_nowait(data)

    # client side helpers
    async def read(self) -> p.Message:
        data = await self.outbox.get()
        reader = p.MessageReader(startup=False)
        reader.receive_data(data)
        msg = reader.next_event()
        assert isinstance(msg, p.Message) and reader.buffered == 0
        return msg

    def write(self, data: bytes) -> None:
        """Frame raw bytes the way the gateway's reader would."""
        reader = p.MessageReader(startup=False)
        reader.receive_data(data)
        msg = reader.next_event()
        assert isinstance(msg, p.Message)
        self.inbox.put_nowait(msg)


def decode_auth(msg: p.Message) -> p.Authentication:
    ev = p.decode_backend(msg)
    assert isinstance(ev, p.Authentication), ev
    return ev


def advertised(msg: p.Message) -> list[str]:
    auth = decode_auth(msg)
    assert auth.code == p.AUTH_SASL
    assert auth.data.endswith(b"\0\0")
    return auth.data[:-2].decode().split("\0")


class Outcome:
    def __init__(self) -> None:
        self.mechanisms: list[str] | None = None
        self.server_final_ok = False
        self.client_first: str | None = None


async def play_client(conv: FakeConversation, password: str, outcome: Outcome, *,
                      channel_binding=None, mechanisms=None, libpq_empty_user: bool = True,
                      user: str = USER, force_mechanism: str | None = None) -> None:
    outcome.mechanisms = advertised(await conv.read())
    client = ScramClient(mechanisms or outcome.mechanisms, user, password,
                         channel_binding=channel_binding)
    first = client.get_client_first()
    if libpq_empty_user:
        # what libpq does: an empty SCRAM user name, and the proof over what it really sent
        assert f"n={user}," in first
        first = first.replace(f"n={user},", "n=,", 1)
        client.client_first_bare = first[first.index("n=,"):]
        assert client.client_first_bare.startswith("n=,r=")
    outcome.client_first = first
    mech = force_mechanism or client.mechanism_name
    conv.write(p.SASLInitialResponse(mech, first.encode()).encode())

    cont = decode_auth(await conv.read())
    assert cont.code == p.AUTH_SASL_CONTINUE
    client.set_server_first(cont.data.decode())
    conv.write(p.Message(b"p", client.get_client_final().encode()).encode())

    final = decode_auth(await conv.read())
    assert final.code == p.AUTH_SASL_FINAL
    client.set_server_final(final.data.decode())  # raises if the server signature is wrong
    outcome.server_final_ok = True


async def run_auth(role: Role | None, password: str, *, user: str = USER,
                   channel_binding_pem: str | None = None, **client_kw) -> tuple[FakeConversation, Outcome]:
    conv = FakeConversation()
    outcome = Outcome()
    client = asyncio.create_task(play_client(conv, password, outcome, user=user, **client_kw))
    try:
        await asyncio.wait_for(
            authenticate(conv, user, role, channel_binding_pem=channel_binding_pem), timeout=20)
    except BaseException:
        if client.done():
            client.result()  # a client-side assertion failure explains more than the error
        client.cancel()
        raise
    # success: the client must accept the server's final message (its signature)
    await asyncio.wait_for(client, timeout=5)
    return conv, outcome


async def run_auth_failing(role, password, code, **kw) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await run_auth(role, password, **kw)
    assert info.value.code == code, str(info.value)
    return info.value


def last_sent(conv: FakeConversation) -> p.Authentication:
    reader = p.MessageReader(startup=False)
    reader.receive_data(conv.sent[-1])
    return decode_auth(reader.next_event())


def role(**kw) -> Role:
    return Role(USER, kw.pop("verifier", VERIFIER), **kw)


# --- authenticate: SCRAM-SHA-256 ---------------------------------------------------------------------


async def test_right_password_succeeds_with_libpq_empty_user():
    conv, outcome = await run_auth(role(), PASSWORD)
    assert outcome.mechanisms == [SCRAM]
    assert outcome.client_first.startswith("n,,n=,r=")
    assert outcome.server_final_ok
    final = last_sent(conv)
    assert final.code == p.AUTH_SASL_FINAL == 12
    assert final.data.startswith(b"v=")
    assert len(conv.sent) == 3  # SASL, SASLContinue, SASLFinal


async def test_right_password_succeeds_with_named_user():
    # some drivers put the user name in client-first; that must keep working too
    conv, outcome = await run_auth(role(), PASSWORD, libpq_empty_user=False)
    assert outcome.client_first.startswith(f"n,,n={USER},r=")
    assert last_sent(conv).code == p.AUTH_SASL_FINAL


async def test_server_first_carries_the_verifier_salt_and_iterations():
    conv, _ = await run_auth(role(), PASSWORD)
    reader = p.MessageReader(startup=False)
    reader.receive_data(conv.sent[1])
    cont = decode_auth(reader.next_event())
    fields = dict(kv.split("=", 1) for kv in cont.data.decode().split(","))
    info = parse_verifier(VERIFIER)
    assert base64.b64decode(fields["s"]) == info.salt
    assert fields["i"] == str(ITER)


async def test_wrong_password_refused_28p01():
    err = await run_auth_failing(role(), "wrong password", INVALID_PASSWORD)
    assert USER in err.message


async def test_wrong_password_sends_no_sasl_final():
    conv = FakeConversation()
    outcome = Outcome()
    task = asyncio.create_task(play_client(conv, "nope", outcome))
    with pytest.raises(GatewayError):
        await authenticate(conv, USER, role(), channel_binding_pem=None)
    task.cancel()
    codes = []
    for raw in conv.sent:
        r = p.MessageReader(startup=False)
        r.receive_data(raw)
        codes.append(decode_auth(r.next_event()).code)
    assert codes == [p.AUTH_SASL, p.AUTH_SASL_CONTINUE]
    assert not outcome.server_final_ok


async def test_unknown_role_reads_like_a_wrong_password():
    # as Postgres: no role-probing oracle; the gateway's metrics still know why
    unknown = await run_auth_failing(None, PASSWORD, INVALID_PASSWORD, user="ghost")
    wrong = await run_auth_failing(role(), "wrong", INVALID_PASSWORD, user="ghost")
    assert unknown.message == wrong.message == 'password authentication failed for user "ghost"'
    assert (unknown.response().encode() == wrong.response().encode())
    assert (unknown.reason, wrong.reason) == ("unknown_role", "password")


async def test_unknown_role_still_runs_the_exchange():
    # a mock salt is served, so the client cannot tell from the exchange that the role is missing
    conv = FakeConversation()
    outcome = Outcome()
    task = asyncio.create_task(play_client(conv, PASSWORD, outcome, user="ghost"))
    with pytest.raises(GatewayError):
        await authenticate(conv, "ghost", None, channel_binding_pem=None)
    task.cancel()
    assert len(conv.sent) == 2


async def test_role_that_cannot_login_refused_28000():
    err = await run_auth_failing(role(can_login=False), PASSWORD, INVALID_AUTHORIZATION)
    assert "log in" in err.message


async def test_role_that_cannot_login_wrong_password_is_a_password_failure():
    await run_auth_failing(role(can_login=False), "wrong", INVALID_PASSWORD)


async def test_expired_role_refused_28p01():
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).isoformat()
    await run_auth_failing(role(valid_until=past), PASSWORD, INVALID_PASSWORD)


async def test_role_valid_until_future_succeeds():
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()
    conv, _ = await run_auth(role(valid_until=future), PASSWORD)
    assert last_sent(conv).code == p.AUTH_SASL_FINAL


async def test_role_without_verifier_refused_28p01():
    await run_auth_failing(role(verifier=None), PASSWORD, INVALID_PASSWORD)


async def test_role_with_md5_password_refused_28p01():
    await run_auth_failing(role(verifier="md53175bce1d3201d16594cebf9d7eb3f9d"), PASSWORD,
                           INVALID_PASSWORD)


async def test_unadvertised_mechanism_refused_08p01():
    # no TLS: only SCRAM-SHA-256 is offered, so choosing -PLUS is a protocol violation
    err = await run_auth_failing(role(), PASSWORD, PROTOCOL_VIOLATION, force_mechanism=SCRAM_PLUS)
    assert "mechanism" in err.message


async def test_unknown_mechanism_refused_08p01():
    await run_auth_failing(role(), PASSWORD, PROTOCOL_VIOLATION, force_mechanism="PLAIN")


async def test_non_p_message_is_a_protocol_violation():
    conv = FakeConversation()
    conv.inbox.put_nowait(p.Message(b"Q", b"select 1\0"))
    with pytest.raises(p.ProtocolViolation):
        await authenticate(conv, USER, role(), channel_binding_pem=None)
    assert len(conv.sent) == 1 and advertised(p.Message(b"R", conv.sent[0][5:])) == [SCRAM]


async def test_non_message_event_is_a_protocol_violation():
    conv = FakeConversation()
    conv.inbox.put_nowait(p.StartupMessage(3, 0, {"user": USER}))
    with pytest.raises(p.ProtocolViolation):
        await authenticate(conv, USER, role(), channel_binding_pem=None)


async def test_sasl_initial_without_data_is_a_protocol_violation():
    conv = FakeConversation()
    conv.write(p.SASLInitialResponse(SCRAM, None).encode())
    with pytest.raises(p.ProtocolViolation):
        await authenticate(conv, USER, role(), channel_binding_pem=None)


async def test_non_p_second_message_is_a_protocol_violation():
    conv = FakeConversation()
    client = ScramClient([SCRAM], USER, PASSWORD)
    conv.write(p.SASLInitialResponse(SCRAM, client.get_client_first().encode()).encode())
    conv.inbox.put_nowait(p.Message(b"Q", b"select 1\0"))
    with pytest.raises(p.ProtocolViolation):
        await authenticate(conv, USER, role(), channel_binding_pem=None)


async def test_invalid_utf8_client_first_is_a_protocol_violation():
    conv = FakeConversation()
    conv.write(p.SASLInitialResponse(SCRAM, b"n,,n=,r=\xff\xfe").encode())
    with pytest.raises(p.ProtocolViolation):
        await authenticate(conv, USER, role(), channel_binding_pem=None)


# --- SCRAM-SHA-256-PLUS with tls-server-end-point ------------------------------------------------------


@pytest.fixture(scope="module")
def leaf():
    ca = trustme.CA()
    cert = ca.issue_cert("abc.db.example.com")
    pem = cert.cert_chain_pems[0].bytes().decode("ascii")
    return pem


def end_point_hash(pem: str) -> bytes:
    """RFC 5929 tls-server-end-point: hash the DER certificate with its signature hash
    (SHA-256 for MD5 or SHA-1)."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    algo = cert.signature_hash_algorithm
    assert isinstance(algo, hashes.SHA256), "the test certificate is SHA-256 signed"
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


async def test_scram_plus_with_channel_binding_succeeds(leaf):
    cb = ("tls-server-end-point", end_point_hash(leaf))
    conv, outcome = await run_auth(role(), PASSWORD, channel_binding_pem=leaf, channel_binding=cb)
    assert outcome.mechanisms == [SCRAM_PLUS, SCRAM]
    assert outcome.client_first.startswith("p=tls-server-end-point,,n=,r=")
    assert outcome.server_final_ok
    assert last_sent(conv).code == p.AUTH_SASL_FINAL


async def test_scram_plus_wrong_password_refused_28p01(leaf):
    cb = ("tls-server-end-point", end_point_hash(leaf))
    await run_auth_failing(role(), "wrong", INVALID_PASSWORD, channel_binding_pem=leaf,
                           channel_binding=cb)


async def test_scram_plus_with_another_certificate_refused_08p01(leaf):
    # a man in the middle presents its own certificate: the client binds to that one
    other = trustme.CA().issue_cert("abc.db.example.com").cert_chain_pems[0].bytes().decode()
    cb = ("tls-server-end-point", end_point_hash(other))
    err = await run_auth_failing(role(), PASSWORD, PROTOCOL_VIOLATION, channel_binding_pem=leaf,
                                 channel_binding=cb)
    assert "channel binding" in err.message


async def test_plain_scram_over_tls_without_binding_support_succeeds(leaf):
    # a client without channel binding support (gs2 flag n) may still use SCRAM-SHA-256
    conv, outcome = await run_auth(role(), PASSWORD, channel_binding_pem=leaf, mechanisms=[SCRAM])
    assert outcome.mechanisms == [SCRAM_PLUS, SCRAM]
    assert outcome.client_first.startswith("n,,")
    assert last_sent(conv).code == p.AUTH_SASL_FINAL


async def test_downgrade_flag_y_refused_08p01(leaf):
    # the client supports binding but thinks the server does not (`y`): a stripped -PLUS offer
    cb = ("tls-server-end-point", end_point_hash(leaf))
    err = await run_auth_failing(role(), PASSWORD, PROTOCOL_VIOLATION, channel_binding_pem=leaf,
                                 channel_binding=cb, mechanisms=[SCRAM])
    assert "channel binding" in err.message.lower()
