"""The fleet's own identity: a cluster CA and one certificate per gateway for the links between
gateways (`pgsni certs cluster`), and the mutual-TLS contexts of those links.

Any certificate the cluster CA signed is a member of the fleet: the links check the chain (and
that it is meant for client and server use), not a name, because peers are reached by
addresses that change (Fly's 6PN addresses, container IPs). Nothing else is trusted: not the
system's CAs, not the clients' CA."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from .context import TLSConfigError
from .generate import issue, new_ca, write_pair

CA_NAME = "pgsni cluster CA"
MEMBER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


@dataclass(frozen=True)
class ClusterFiles:
    ca: Path
    ca_key: Path
    members: dict[str, tuple[Path, Path]]  # name -> (certificate, key)


def make_cluster(out: Path, names: list[str], *, days: int = 3650) -> ClusterFiles:
    """The CA in `out` (made if `out` has none, else reused: every member must come from one
    CA) and a certificate and key for each gateway name."""
    for name in names:
        if not MEMBER_NAME.fullmatch(name):
            raise ValueError(f"gateway name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'")
    out.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = out / "ca.pem", out / "ca-key.pem"
    if ca_path.exists() != ca_key_path.exists():
        raise TLSConfigError(f"{out} holds only one of ca.pem and ca-key.pem: restore the other, "
                             "or remove both to make a new cluster CA (and new certificates for every gateway)")
    if ca_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_cert, ca_key = new_ca(CA_NAME, days=days)
        write_pair(ca_path, ca_cert, ca_key_path, ca_key)
    members = {}
    for name in names:
        cert, key = issue(ca_cert, ca_key, name, [x509.DNSName(name)],  # type: ignore[arg-type]
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=days)
        cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
        write_pair(cert_path, cert, key_path, key)
        members[name] = (cert_path, key_path)
    return ClusterFiles(ca_path, ca_key_path, members)


def link_server_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The internal listener's context: TLS 1.3, a client certificate from the cluster CA required."""
    return _link_context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)


def link_client_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """For connecting to a peer: TLS 1.3, this gateway's certificate shown, only a server
    certificate from the cluster CA accepted."""
    return _link_context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)


def _link_context(protocol: int, ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    for setting, path in (("cluster_ca", ca), ("cluster_cert", cert), ("cluster_key", key)):
        if not Path(path).is_file():
            raise TLSConfigError(f"{setting}: {path} does not exist; make the cluster's certificates "
                                 "with `pgsni certs cluster --out DIR --name GATEWAY`")
    _check_issued_by(Path(cert), Path(ca))
    ctx = ssl.SSLContext(protocol)  # no default CAs: only the cluster CA is trusted
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # membership is the CA's signature, not an address (above)
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"cannot load the cluster certificate {cert} with key {key} "
                             f"and CA {ca}: {e}") from None
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def _check_issued_by(cert: Path, ca: Path) -> None:
    """A clear error at start-up rather than every peer refusing this gateway later."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        authority = x509.load_pem_x509_certificate(ca.read_bytes())
    except ValueError as e:
        raise TLSConfigError(f"cluster_cert {cert} or cluster_ca {ca} is not a PEM certificate: {e}") from None
    try:
        leaf.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        raise TLSConfigError(f"cluster_cert {cert} was not issued by cluster_ca {ca}: other "
                             "gateways would refuse it") from None
