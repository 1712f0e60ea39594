"""TLS material from the bucket (tls_from_storage), end to end: a real gateway on a moto S3
bucket, real clients (psql, psycopg) verifying against two different CAs. A new pair in the
bucket is picked up for new connections while open ones carry on; a bad pair or a storage
outage leaves the current certificate in use; no pair at all stops start-up; and
`pgsni certs upload` puts a checked pair into the bucket."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import trustme
from scramp import ScramClient

from certs.context import TLSConfigError
from gateway.wire import protocol as p

from ..support.harness import DOMAIN, TEST_PASSWORD, conninfo, psql
from ..support.moto import ACCESS_KEY, SECRET_KEY
from ..support.rawclient import RawClient

PGSNI = Path(sys.executable).parent / "pgsni"
PREFIX = "pgsni/"  # s3_settings' prefix
WAIT = 10.0


@dataclass
class Pair:
    ca: Path
    cert: Path
    key: Path


def make_pair(d: Path) -> Pair:
    ca = trustme.CA()
    issued = ca.issue_cert(f"*.{DOMAIN}")
    d.mkdir(parents=True)
    pair = Pair(d / "ca.pem", d / "server.pem", d / "server-key.pem")
    ca.cert_pem.write_to_path(str(pair.ca))
    pair.cert.write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(pair.key))
    return pair


@pytest.fixture
def pairs(tmp_path) -> tuple[Pair, Pair]:
    return make_pair(tmp_path / "a"), make_pair(tmp_path / "b")


@pytest.fixture
def bucket(moto_server, s3_settings):
    """put(name, path) writes tls/<name> under the gateway's prefix, straight into moto."""
    client = moto_server.client()
    name = s3_settings["s3_bucket"]

    class Bucket:
        def put(self, obj: str, path: Path) -> None:
            client.put_object(Bucket=name, Key=f"{PREFIX}tls/{obj}", Body=path.read_bytes())

        def put_pair(self, cert: Path, key: Path) -> None:
            self.put("key.pem", key)
            self.put("cert.pem", cert)

        def read(self, obj: str) -> bytes | None:
            try:
                return client.get_object(Bucket=name, Key=f"{PREFIX}tls/{obj}")["Body"].read()
            except client.exceptions.NoSuchKey:
                return None

    return Bucket()


def tls_settings(s3_settings: dict) -> dict:
    # tls_cert/tls_key point nowhere: the pair must come from the bucket
    return dict(s3_settings, tls_from_storage=True, tls_reload_seconds=0.3,
                tls_cert="/nonexistent/server.pem", tls_key="/nonexistent/server-key.pem")


def connects(port: int, pair: Pair, **extra: str) -> subprocess.CompletedProcess:
    return psql(conninfo(port, pair.ca, **extra), "select 'ok'", timeout=30)


def wait_until(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def tls_records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pgsni.tls" and r.levelno == level]


def test_new_certificate_from_the_bucket_is_used_for_new_connections(
        s3_settings, s3_proxy, bucket, start_gateway, pairs, caplog):
    caplog.set_level(logging.INFO, logger="pgsni.tls")
    a, b = pairs
    bucket.put_pair(a.cert, a.key)
    gt = start_gateway(**tls_settings(s3_settings))
    gt.create_db("app1")
    first = connects(gt.port, a)
    assert first.returncode == 0 and first.stdout.strip() == "ok", first.stderr
    assert "certificate verify failed" in connects(gt.port, b).stderr

    with psycopg.connect(conninfo(gt.port, a.ca), autocommit=True) as old:
        pid = old.execute("select pg_backend_pid()").fetchone()[0]

        # pair B: new connections verify with B's CA, no longer with A's
        bucket.put_pair(b.cert, b.key)
        started = time.monotonic()
        wait_until(lambda: connects(gt.port, b).returncode == 0, "the gateway to present B")
        took = time.monotonic() - started
        refused = connects(gt.port, a)
        assert refused.returncode != 0 and "certificate verify failed" in refused.stderr
        assert took < 5, f"reload took {took:.1f}s with tls_reload_seconds=0.3"
        # SCRAM-SHA-256-PLUS binds to the certificate this connection saw: B's
        bound = connects(gt.port, b, channel_binding="require")
        assert bound.returncode == 0 and bound.stdout.strip() == "ok", bound.stderr
        # the connection made with A carries on, in the same backend
        assert old.execute("select 40 + 2, pg_backend_pid()").fetchone() == (42, pid)
        # the private copy holds B, readable by the gateway only
        saved = gt.settings.data_path / ".tls"
        assert (saved / "cert.pem").read_bytes() == b.cert.read_bytes()
        assert (saved / "key.pem").read_bytes() == b.key.read_bytes()
        assert oct(saved.stat().st_mode & 0o777) == "0o700"
        assert oct((saved / "key.pem").stat().st_mode & 0o777) == "0o600"

        # B's certificate with A's key: refused with an error, B stays in use
        bucket.put("key.pem", a.key)
        wait_until(lambda: tls_records(caplog, logging.ERROR), "an error about the bad pair")
        assert "cannot be used" in tls_records(caplog, logging.ERROR)[0]
        assert connects(gt.port, b).returncode == 0
        assert connects(gt.port, b, channel_binding="require").returncode == 0
        assert connects(gt.port, a).returncode != 0
        assert (saved / "key.pem").read_bytes() == b.key.read_bytes()

        # storage down while polling: warnings, B still served; back up: the next pair loads
        s3_proxy.cut()
        try:
            wait_until(lambda: any("cannot check" in m for m in tls_records(caplog, logging.WARNING)),
                       "a warning about the storage outage")
            assert connects(gt.port, b).returncode == 0
        finally:
            s3_proxy.restore()
        bucket.put_pair(a.cert, a.key)
        wait_until(lambda: connects(gt.port, a).returncode == 0, "the gateway to present A again")
        assert connects(gt.port, a, channel_binding="require").returncode == 0
        assert old.execute("select 7").fetchone() == (7,)


def test_handshake_before_a_swap_binds_to_the_certificate_it_saw(s3_settings, bucket,
                                                                   start_gateway, pairs):
    """A client that finished TLS with A, then logs in after the gateway moved to B, must be
    checked against A in SCRAM-SHA-256-PLUS (tls-server-end-point of its own handshake)."""
    a, b = pairs
    bucket.put_pair(a.cert, a.key)
    gt = start_gateway(**tls_settings(s3_settings))
    gt.create_db("app1")
    raw = RawClient(gt.port)
    try:
        raw.start_tls(str(a.ca), f"app1.{DOMAIN}")  # handshake done with A
        bucket.put_pair(b.cert, b.key)
        wait_until(lambda: connects(gt.port, b, channel_binding="require").returncode == 0,
                   "the gateway to present B")
        raw.startup({"user": "postgres", "database": "postgres"})
        offer = raw.next_backend()
        assert isinstance(offer, p.Authentication) and offer.code == p.AUTH_SASL, offer
        assert b"SCRAM-SHA-256-PLUS" in offer.data
        client = ScramClient(["SCRAM-SHA-256-PLUS"], "postgres", TEST_PASSWORD,
                             channel_binding=("tls-server-end-point", raw.sock))
        raw.send(p.SASLInitialResponse("SCRAM-SHA-256-PLUS", client.get_client_first().encode()).encode())
        cont = raw.next_backend()
        assert isinstance(cont, p.Authentication) and cont.code == p.AUTH_SASL_CONTINUE, cont
        client.set_server_first(cont.data.decode())
        raw.send(p.Message(b"p", client.get_client_final().encode()).encode())
        final = raw.next_backend()
        assert isinstance(final, p.Authentication) and final.code == p.AUTH_SASL_FINAL, final
        client.set_server_final(final.data.decode())
        assert raw.next_backend() == p.Authentication(p.AUTH_OK)
    finally:
        raw.close()


@pytest.mark.parametrize("present", [(), ("cert.pem",)], ids=["empty", "cert-only"])
def test_start_up_without_the_pair_in_storage_fails_clearly(s3_settings, bucket, start_gateway,
                                                            pairs, present):
    a, _ = pairs
    for obj in present:
        bucket.put(obj, a.cert)
    with pytest.raises(TLSConfigError) as e:
        start_gateway(**tls_settings(s3_settings))
    msg = str(e.value)
    missing = "tls/key.pem" if present else "tls/cert.pem"
    assert f"{missing} is not in storage s3://" in msg
    assert "pgsni certs upload --cert" in msg
    assert f"pgsni certs generate --domain {DOMAIN} --out DIR" in msg
    assert "DIR/server.pem as tls/cert.pem" in msg and "DIR/server-key.pem as tls/key.pem" in msg


def test_certs_upload_round_trip(s3_settings, bucket, start_gateway, pairs, data_root):
    a, b = pairs
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSNI_")} | {
        "PGSNI_STORAGE": "s3", "PGSNI_S3_BUCKET": s3_settings["s3_bucket"],
        "PGSNI_S3_PREFIX": PREFIX, "PGSNI_S3_ENDPOINT": s3_settings["s3_endpoint"],
        "PGSNI_S3_REGION": "us-east-1", "PGSNI_S3_ACCESS_KEY": ACCESS_KEY,
        "PGSNI_S3_SECRET_KEY": SECRET_KEY, "PGSNI_DATA_ROOT": str(data_root),
        "PGSNI_TLS_FROM_STORAGE": "true"}

    def upload(cert: Path, key: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(PGSNI), "certs", "upload", "--cert", str(cert), "--key", str(key)],
                              capture_output=True, text=True, timeout=60, env=env)

    bad = upload(a.cert, b.key)
    assert bad.returncode != 0 and "cannot load TLS certificate" in bad.stderr, bad.stderr
    assert bucket.read("cert.pem") is None and bucket.read("key.pem") is None

    good = upload(a.cert, a.key)
    assert good.returncode == 0, good.stderr
    assert "tls/cert.pem" in good.stdout and "s3://" in good.stdout
    assert bucket.read("cert.pem") == a.cert.read_bytes()
    assert bucket.read("key.pem") == a.key.read_bytes()

    gt = start_gateway(**tls_settings(s3_settings))
    gt.create_db("app1")
    r = connects(gt.port, a, channel_binding="require")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
