"""Write a development CA and a wildcard server certificate for `*.<domain>` (cryptography),
and the CA and issuing helpers certs/cluster.py uses for the gateways' own links.

The development pair is for development and tests only: production certificates for
clients come from a real CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class DevCerts:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path


def paths(out: Path) -> DevCerts:
    return DevCerts(out / "ca.pem", out / "ca-key.pem", out / "server.pem", out / "server-key.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgsni development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          names: list[x509.GeneralName], usages: list[x509.ObjectIdentifier], *,
          days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and a certificate for it, signed by the CA, for `names` and `usages`."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def new_ca(common_name: str, *, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA (that signs leaf certificates only) and its key."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_pair(cert_path: Path, cert: x509.Certificate, key_path: Path,
               key: ec.EllipticCurvePrivateKey) -> None:
    """A certificate (0644) and its private key (0600)."""
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(key_path, _key_pem(key), 0o600)


def generate(domains: list[str], out: Path, *, days: int = 825) -> DevCerts:
    """Create a CA and a server certificate valid for each domain and `*.domain`."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = new_ca("pgsni development CA", days=days)
    names: list[x509.GeneralName] = []
    for d in domains:
        names += [x509.DNSName(f"*.{d}"), x509.DNSName(d)]
    names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert, key = issue(ca_cert, ca_key, f"*.{domains[0]}", names, [ExtendedKeyUsageOID.SERVER_AUTH],
                      days=days)
    p = paths(out)
    write_pair(p.ca, ca_cert, p.ca_key, ca_key)
    write_pair(p.cert, cert, p.key, key)
    return p
