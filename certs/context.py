"""The gateway's server-side SSLContext: TLS 1.2+, ALPN `postgresql`, and an SNI callback
that records the requested name on the SSLObject for routing."""

from __future__ import annotations

import ssl
from pathlib import Path

ALPN = "postgresql"
SNI_ATTR = "pgsni_server_name"


class TLSConfigError(Exception):
    pass


def _remember_sni(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    setattr(sslobj, SNI_ATTR, server_name)


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    for label, path in (("certificate", cert), ("key", key)):
        if not Path(path).is_file():
            raise TLSConfigError(
                f"TLS {label} not found at {path}; for development, create one with "
                "`pgsni certs generate --domain db.example.com --out certs/dev`")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"cannot load TLS certificate {cert} with key {key}: {e}") from None
    ctx.set_alpn_protocols([ALPN])
    ctx.sni_callback = _remember_sni
    # Session tickets would need rotating keys shared across restarts; not worth it here.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def server_name(sslobj: ssl.SSLObject | None) -> str | None:
    return getattr(sslobj, SNI_ATTR, None) if sslobj is not None else None


def leaf_certificate_pem(cert: str | Path) -> str:
    """The first certificate of the chain, for SCRAM tls-server-end-point channel binding."""
    text = Path(cert).read_text()
    end = "-----END CERTIFICATE-----"
    start = text.find("-----BEGIN CERTIFICATE-----")
    if start < 0:
        raise TLSConfigError(f"{cert} holds no PEM certificate")
    return text[start : text.index(end, start) + len(end)] + "\n"
