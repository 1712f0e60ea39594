"""gateway/wire/opening.py: a connection's first bytes, without a socket."""

from __future__ import annotations

import pytest

from gateway.wire import protocol as p
from gateway.wire.opening import HEAD, Opening, classify, is_direct_tls


def test_direct_tls_is_seen_from_the_first_byte():
    assert is_direct_tls(b"\x16\x03\x01")
    assert not is_direct_tls(b"\x00") and not is_direct_tls(b"")


@pytest.mark.parametrize("message, opening", [
    (p.SSLRequest(), Opening.SSL_REQUEST),
    (p.GSSENCRequest(), Opening.GSSENC_REQUEST),
    (p.CancelRequest(7, b"abcd"), Opening.MESSAGE),
    (p.StartupMessage(3, 0, {"user": "u"}), Opening.MESSAGE),
])
def test_openings(message, opening):
    assert classify(message.encode()[:HEAD]) is opening


def test_a_request_code_with_another_length_is_a_message_for_the_reader():
    # the reader then refuses it with its own error (an SSLRequest is exactly 8 bytes)
    head = (12).to_bytes(4, "big") + p.SSL_REQUEST_CODE.to_bytes(4, "big")
    assert classify(head) is Opening.MESSAGE


def test_too_few_bytes_are_refused():
    with pytest.raises(ValueError):
        classify(b"\x00\x00\x00\x08")
