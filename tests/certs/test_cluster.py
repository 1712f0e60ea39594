"""The cluster CA and member certificates (certs/cluster.py, `pgsni certs cluster`) and the
links' mutual-TLS contexts, with in-memory handshakes."""

from __future__ import annotations

import ssl

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.cluster import link_client_context, link_server_context, make_cluster
from certs.context import TLSConfigError
from gateway.cli.main import main

from .test_generate import handshake


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    return make_cluster(tmp_path_factory.mktemp("cluster"), ["gw-a", "gw-b"], days=2)


def contexts(cluster, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = cluster.members[name]
    return link_server_context(cluster.ca, cert, key), link_client_context(cluster.ca, cert, key)


def test_members_authenticate_each_other(cluster):
    server_a, _ = contexts(cluster, "gw-a")
    _, client_b = contexts(cluster, "gw-b")
    server, client = handshake(server_a, client_b, None)
    assert server.version() == "TLSv1.3"
    assert server.getpeercert()["subject"][-1] == (("commonName", "gw-b"),)
    assert client.getpeercert()["subject"][-1] == (("commonName", "gw-a"),)


def test_member_certificates_serve_both_ends_and_keys_are_private(cluster):
    cert_path, key_path = cluster.members["gw-a"]
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert key_path.stat().st_mode & 0o077 == 0
    assert cluster.ca_key.stat().st_mode & 0o077 == 0


def test_a_client_without_a_certificate_is_refused(cluster):
    server_a, _ = contexts(cluster, "gw-a")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=str(cluster.ca))
    anonymous.check_hostname = False
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|PEER_DID_NOT_RETURN_A_CERTIFICATE"):
        handshake(server_a, anonymous, None)


def test_a_certificate_of_another_cluster_is_refused_both_ways(cluster, tmp_path):
    other = make_cluster(tmp_path, ["gw-x"], days=2)
    server_a, client_a = contexts(cluster, "gw-a")
    server_x, client_x = contexts(other, "gw-x")
    with pytest.raises(ssl.SSLError):
        handshake(server_a, client_x, None)
    with pytest.raises(ssl.SSLError):
        handshake(server_x, client_a, None)


def test_the_clients_certificate_authority_is_not_trusted(cluster, tls):
    """A certificate of the public side's CA (a client's, or the gateway's wildcard) is no member."""
    server_a, _ = contexts(cluster, "gw-a")
    outsider = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    outsider.check_hostname, outsider.verify_mode = False, ssl.CERT_NONE
    outsider.load_cert_chain(str(tls["cert"]), str(tls["key"]))
    with pytest.raises(ssl.SSLError):
        handshake(server_a, outsider, None)


def test_tls_1_2_is_refused(cluster):
    server_a, client_b = contexts(cluster, "gw-a")[0], contexts(cluster, "gw-b")[1]
    client_b.minimum_version = client_b.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(server_a, client_b, None)


def test_the_ca_is_reused_so_later_members_join(cluster):
    again = make_cluster(cluster.ca.parent, ["gw-c"], days=2)
    assert again.ca == cluster.ca
    server_a, _ = contexts(cluster, "gw-a")
    handshake(server_a, contexts(again, "gw-c")[1], None)


def test_contexts_name_what_is_wrong(cluster, tmp_path):
    cert, key = cluster.members["gw-a"]
    with pytest.raises(TLSConfigError, match="cluster_ca: .* does not exist.*pgsni certs cluster"):
        link_server_context(tmp_path / "none.pem", cert, key)
    other = make_cluster(tmp_path / "other", ["gw-x"], days=2)
    with pytest.raises(TLSConfigError, match="was not issued by cluster_ca"):
        link_server_context(cluster.ca, *other.members["gw-x"])
    with pytest.raises(TLSConfigError, match="cannot load"):
        link_client_context(cluster.ca, cert, cluster.members["gw-b"][1])  # another member's key


def test_half_a_ca_is_refused(tmp_path):
    made = make_cluster(tmp_path, ["gw-a"], days=2)
    made.ca_key.unlink()
    with pytest.raises(TLSConfigError, match="only one of ca.pem and ca-key.pem"):
        make_cluster(tmp_path, ["gw-b"], days=2)


def test_certs_cluster_command(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["certs", "cluster", "--out", str(tmp_path), "--name", "gw-a", "--name", "gw-b"])
    assert out.exit_code == 0, out.output
    assert f"gw-b: cluster_cert={tmp_path}/gw-b.pem cluster_key={tmp_path}/gw-b-key.pem" in out.output
    first = (tmp_path / "gw-a.pem").read_bytes()
    again = runner.invoke(main, ["certs", "cluster", "--out", str(tmp_path), "--name", "gw-a"])
    assert again.exit_code != 0 and "--force" in again.output
    assert (tmp_path / "gw-a.pem").read_bytes() == first
    bad = runner.invoke(main, ["certs", "cluster", "--out", str(tmp_path), "--name", "../x"])
    assert bad.exit_code != 0 and "gateway name '../x'" in bad.output
