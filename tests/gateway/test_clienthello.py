"""gateway/wire/clienthello.py: the server name of a real ClientHello (made by OpenSSL through
Python's ssl, as libpq's is), whole, cut short, split over records, and hostile bytes."""

from __future__ import annotations

import random
import ssl
import struct

import pytest

from gateway.wire.clienthello import MAX_RECORD, NEED_MORE, Hello, HelloError, read_hello


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def reframe(hello: bytes, size: int) -> bytes:
    """The same handshake message in records of `size` bytes."""
    message = hello[5:]
    out = b""
    for i in range(0, len(message), size):
        chunk = message[i:i + size]
        out += struct.pack("!BHH", 22, 0x0301, len(chunk)) + chunk
    return out


def test_the_server_name_of_a_real_hello():
    hello = client_hello("12345.db.example.com", ["postgresql"])
    assert read_hello(hello) == Hello("12345.db.example.com", len(hello))
    assert read_hello(hello + b"\x17\x03\x03 more") == Hello("12345.db.example.com", len(hello))


def test_no_server_name_and_names_as_dns_compares_them():
    assert read_hello(client_hello(None)).server_name is None
    assert read_hello(client_hello("127.0.0.1")).server_name is None  # OpenSSL sends no SNI for an IP
    assert read_hello(client_hello("Db7.DB.Example.COM")).server_name == "db7.db.example.com"


def test_every_prefix_needs_more():
    hello = client_hello("a.db.example.com")
    for n in range(len(hello)):
        assert read_hello(hello[:n]) is NEED_MORE, n


@pytest.mark.parametrize("size", [1, 7, 100, 512])
def test_a_hello_split_over_records(size):
    framed = reframe(client_hello("split.db.example.com"), size)
    assert read_hello(framed) == Hello("split.db.example.com", len(framed))
    assert read_hello(framed[:-1]) is NEED_MORE


@pytest.mark.parametrize("bad, why", [
    (b"\x17\x03\x03\x00\x05hello", "type 23"),  # application data
    (b"\x16\x03\x01\x00\x00", "0 bytes"),
    (struct.pack("!BHH", 22, 0x0301, MAX_RECORD + 1), "16385 bytes"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "expected a ClientHello"),  # a ServerHello
    (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "ClientHello of"),  # 16 MiB announced
    (b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03", "ends inside a field"),
])
def test_malformed_records_are_refused(bad, why):
    with pytest.raises(HelloError, match=why):
        read_hello(bad)


def rebuilt(server_names: bytes) -> bytes:
    """A minimal ClientHello whose only extension is server_name with `server_names`."""
    ext = struct.pack("!HH", 0, len(server_names) + 2) + struct.pack("!H", len(server_names)) + server_names
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(ext)) + ext
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return struct.pack("!BHH", 22, 0x0301, len(message)) + message


def name(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def test_hostile_server_names():
    assert read_hello(rebuilt(name(0, b"ok.db.example.com."))).server_name == "ok.db.example.com"
    assert read_hello(rebuilt(name(7, b"x") + name(0, b"b.example.com"))).server_name == "b.example.com"
    for bad, why in [(name(0, b"a") + name(0, b"b"), "two host names"),
                     (name(0, b""), "0 bytes"),
                     (name(0, b"x" * 254), "254 bytes"),
                     (name(0, "ü.example.com".encode()), "not ASCII"),
                     (name(0, b"a\x00.example.com"), "cannot have"),
                     (name(0, b"a/../b"), "cannot have")]:
        with pytest.raises(HelloError, match=why):
            read_hello(rebuilt(bad))


def test_random_damage_gives_an_answer_or_hello_error_and_nothing_else():
    hello = client_hello("fuzz.db.example.com", ["postgresql"])
    rng = random.Random(1234)
    outcomes = {"hello": 0, "need more": 0, "refused": 0}
    for _ in range(3000):
        damaged = bytearray(hello)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            result = read_hello(bytes(damaged))
        except HelloError:
            outcomes["refused"] += 1
            continue
        outcomes["need more" if result is NEED_MORE else "hello"] += 1
    print(outcomes)
    assert outcomes["refused"] and outcomes["hello"]
