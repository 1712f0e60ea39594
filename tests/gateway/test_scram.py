"""gateway/wire/scram.py: the ClientKey a verified proof reveals, and a client exchange that logs
in with it, checked against scramp's server (an independent SCRAM implementation) and
against the gateway's own authenticate()."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest
from hypothesis import given, settings, strategies as st
from scramp import ScramMechanism

from gateway.proxy.auth import authenticate
from gateway.wire.scram import (
    ScramClient, ScramError, ScramKeys, parse_verifier, recover_keys, scram_verifier)
from storage.roles import Role

from .test_auth import FakeConversation, Outcome, play_client

PASSWORD = "correct horse battery staple"
VERIFIER = scram_verifier(PASSWORD)


def keys_from_password(password: str, verifier: str) -> ScramKeys:
    info = parse_verifier(verifier)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), info.salt, info.iterations)
    return ScramKeys(hmac.new(salted, b"Client Key", hashlib.sha256).digest(), info.server_key)


def scramp_server(verifier: str):
    info = parse_verifier(verifier)
    return ScramMechanism().make_server(lambda _user: info.as_tuple())


def exchange(keys: ScramKeys, verifier: str) -> None:
    """A whole exchange of our client against scramp's server; raises if either refuses."""
    server = scramp_server(verifier)
    client = ScramClient(keys)
    first = client.first().decode().replace("n=,", "n=*,", 1)  # scramp wants a user name
    server.set_client_first(first)
    server.client_first_bare = client.first().decode()[3:]  # the proof is over what was sent
    final = client.final(server.get_server_first().encode())
    server.set_client_final(final.decode())
    client.verify(server.get_server_final().encode())


async def test_authenticate_returns_the_roles_keys():
    conv, outcome = FakeConversation(), Outcome()
    client = asyncio.create_task(play_client(conv, PASSWORD, outcome, user="alice"))
    keys = await authenticate(conv, "alice", Role("alice", VERIFIER), channel_binding_pem=None)
    await client
    assert keys == keys_from_password(PASSWORD, VERIFIER)
    assert "client_key" not in repr(keys) and keys.client_key.hex() not in repr(keys)


def test_keys_log_in_against_an_independent_server():
    exchange(keys_from_password(PASSWORD, VERIFIER), VERIFIER)


def test_other_keys_are_refused_by_the_server():
    # the password was changed after the gateway read the verifier: Postgres says no
    other = scram_verifier("a new password")
    with pytest.raises(Exception):
        exchange(keys_from_password(PASSWORD, VERIFIER), other)


def test_a_server_that_does_not_know_the_verifier_is_caught():
    keys = keys_from_password(PASSWORD, VERIFIER)
    wrong_server = ScramKeys(keys.client_key, b"\0" * 32)
    with pytest.raises(ScramError, match="signature"):
        exchange(wrong_server, VERIFIER)


@pytest.mark.parametrize("server_first", [b"r=someone-else,s=c2FsdA==,i=4096", b"garbage", b"r=,s=x,i=1"])
def test_a_server_first_that_does_not_continue_the_exchange_is_refused(server_first):
    with pytest.raises(ScramError):
        ScramClient(ScramKeys(b"k" * 32, b"s" * 32), nonce="abc").final(server_first)


def test_an_error_in_server_final_is_reported():
    client = ScramClient(ScramKeys(b"k" * 32, b"s" * 32), nonce="abc")
    client.final(b"r=abcdef,s=c2FsdA==,i=4096")
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify(b"e=invalid-proof")


def test_recover_keys_refuses_a_proof_that_does_not_match():
    info = parse_verifier(VERIFIER)
    with pytest.raises(ScramError):
        recover_keys(info.stored_key, info.server_key, "n=,r=a", "r=ab,s=c2FsdA==,i=4096",
                     "c=biws,r=ab,p=" + "A" * 44)


@settings(max_examples=20, deadline=None)
@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40))
def test_any_password_round_trips(password):
    verifier = scram_verifier(password)
    exchange(keys_from_password(password, verifier), verifier)
