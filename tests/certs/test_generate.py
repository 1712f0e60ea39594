"""Unit tests for certs/generate.py and certs/context.py, with in-memory TLS (ssl.MemoryBIO)."""

from __future__ import annotations

import os
import ssl
import stat
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.context import (
    ALPN,
    TLSConfigError,
    leaf_certificate_pem,
    server_context,
    server_name,
)
from certs.generate import generate, paths

DOMAIN = "db.example.com"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs") / "dev"  # generate() creates the directory
    return generate([DOMAIN, "pg.example.org"], out)


def client_context(ca: Path, *, alpn: list[str] | None = None,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str | None):
    """Run a full TLS handshake in memory; return (server SSLObject, client SSLObject)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(50):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if client_done and server_done:
            return server, client
    raise AssertionError("TLS handshake did not finish")


def test_generate_writes_four_files_with_modes(dev):
    assert dev == paths(dev.ca.parent)
    for path in (dev.ca, dev.ca_key, dev.cert, dev.key):
        assert path.is_file() and path.stat().st_size > 0
    assert stat.S_IMODE(os.stat(dev.ca_key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dev.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dev.ca).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dev.cert).st_mode) == 0o644
    assert dev.key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert dev.cert.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_generate_key_mode_even_when_file_existed_world_readable(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "server-key.pem").write_text("old")
    os.chmod(out / "server-key.pem", 0o644)
    p = generate([DOMAIN], out, days=1)
    assert stat.S_IMODE(os.stat(p.key).st_mode) == 0o600
    assert p.key.read_text() != "old"


def test_generated_certificate_contents(dev):
    ca = x509.load_pem_x509_certificate(dev.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(dev.cert.read_bytes())
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    assert {"*.db.example.com", "db.example.com", "*.pg.example.org", "pg.example.org",
            "localhost"} <= set(dns)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_handshake_verifies_against_ca_and_records_sni(dev):
    server_ctx = server_context(dev.cert, dev.key)
    server, client = handshake(server_ctx, client_context(dev.ca), "abc.db.example.com")
    assert server_name(server) == "abc.db.example.com"
    assert client.getpeercert()["subject"]  # verified: the default client context requires it
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    assert server.selected_alpn_protocol() is None  # the client offered none


def test_handshake_second_domain(dev):
    server, _ = handshake(server_context(dev.cert, dev.key), client_context(dev.ca),
                          "xyz.pg.example.org")
    assert server_name(server) == "xyz.pg.example.org"


def test_alpn_postgresql_selected(dev):
    server_ctx = server_context(dev.cert, dev.key)
    server, client = handshake(server_ctx, client_context(dev.ca, alpn=[ALPN]), "abc.db.example.com")
    assert ALPN == "postgresql"
    assert server.selected_alpn_protocol() == "postgresql"
    assert client.selected_alpn_protocol() == "postgresql"


def test_alpn_preferred_among_several(dev):
    server, _ = handshake(server_context(dev.cert, dev.key),
                          client_context(dev.ca, alpn=["h2", "postgresql"]), "abc.db.example.com")
    assert server.selected_alpn_protocol() == "postgresql"


def test_no_sni_recorded_as_none(dev):
    client_ctx = client_context(dev.ca)
    client_ctx.check_hostname = False
    server, _ = handshake(server_context(dev.cert, dev.key), client_ctx, None)
    assert server_name(server) is None


def test_server_name_of_no_ssl_object():
    assert server_name(None) is None


def test_wrong_host_name_fails_verification(dev):
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(dev.cert, dev.key), client_context(dev.ca), "abc.other.net")


def test_untrusted_ca_fails_verification(dev, tmp_path):
    other = generate([DOMAIN], tmp_path / "other", days=1)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(dev.cert, dev.key), client_context(other.ca), "abc.db.example.com")


def _tls11_client(ca: Path) -> ssl.SSLContext:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = client_context(ca, maximum=ssl.TLSVersion.TLSv1_1)
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this Python/OpenSSL cannot configure a TLS 1.1 client: {e}")
    if not ssl.HAS_TLSv1_1:
        pytest.skip(f"{ssl.OPENSSL_VERSION} was built without TLS 1.1")
    # OpenSSL 3's default security level disables TLS 1.1 in the client itself; lower it so
    # the ClientHello really offers 1.1 and the *server* has to decide
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    return ctx


def test_tls_1_1_client_refused(dev):
    client_ctx = _tls11_client(dev.ca)
    server_ctx = server_context(dev.cert, dev.key)
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="abc.db.example.com")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the ClientHello is written; waiting for the server
    except ssl.SSLError as e:
        pytest.skip(f"{ssl.OPENSSL_VERSION} cannot even offer TLS 1.1: {e}")
    hello = c_out.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record: the client did send its hello
    s_in.write(hello)
    with pytest.raises(ssl.SSLError) as info:
        server.do_handshake()
    assert info.value.reason in ("UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER",
                                 "TLSV1_ALERT_PROTOCOL_VERSION"), info.value
    assert server.version() is None


def test_tls_1_2_client_accepted(dev):
    client_ctx = client_context(dev.ca, maximum=ssl.TLSVersion.TLSv1_2)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _, client = handshake(server_context(dev.cert, dev.key), client_ctx, "abc.db.example.com")
    assert client.version() == "TLSv1.2"


def test_server_context_missing_cert(dev, tmp_path):
    with pytest.raises(TLSConfigError, match="pgsni certs generate") as info:
        server_context(tmp_path / "nope.pem", dev.key)
    assert "certificate" in str(info.value) and "nope.pem" in str(info.value)


def test_server_context_missing_key(dev, tmp_path):
    with pytest.raises(TLSConfigError, match="pgsni certs generate") as info:
        server_context(dev.cert, tmp_path / "nokey.pem")
    assert "key" in str(info.value) and "nokey.pem" in str(info.value)


def test_server_context_mismatched_key(dev, tmp_path):
    other = generate([DOMAIN], tmp_path / "other", days=1)
    with pytest.raises(TLSConfigError, match="cannot load"):
        server_context(dev.cert, other.key)


def test_leaf_certificate_pem_returns_only_the_first(dev, tmp_path):
    chain = tmp_path / "chain.pem"
    leaf_text = dev.cert.read_text()
    chain.write_text("# a comment before the chain\n" + leaf_text + dev.ca.read_text())
    got = leaf_certificate_pem(chain)
    assert got.count("-----BEGIN CERTIFICATE-----") == 1
    assert got.count("-----END CERTIFICATE-----") == 1
    assert got.startswith("-----BEGIN CERTIFICATE-----")
    assert got.endswith("-----END CERTIFICATE-----\n")
    assert got.strip() == leaf_text.strip()
    leaf = x509.load_pem_x509_certificate(got.encode())
    assert leaf == x509.load_pem_x509_certificate(dev.cert.read_bytes())


def test_leaf_certificate_pem_without_certificate(tmp_path):
    path = tmp_path / "empty.pem"
    path.write_text("nothing here\n")
    with pytest.raises(TLSConfigError):
        leaf_certificate_pem(path)
