"""Unit tests for certs/reload.py on a LocalDirBackend: loading, the private copy, reloading
on change, refusing bad pairs, storage outages, and the upload helper. TLS is checked with
real in-memory handshakes."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from certs.context import TLSConfigError
from certs.reload import CERT_KEY, KEY_KEY, TLSMaterial, upload
from gateway import supervise
from gateway.metrics import Metrics
from storage.backend import Backend
from storage.errors import StorageUnavailable
from storage.localdir import LocalDirBackend

from .test_generate import client_context, handshake

DOMAIN = "db.example.com"
HOST = f"app1.{DOMAIN}"


@dataclass
class Pair:
    ca: Path
    cert: bytes
    key: bytes
    leaf_der: bytes


def make_pair(d: Path, name: str) -> Pair:
    ca = trustme.CA()
    issued = ca.issue_cert(f"*.{DOMAIN}", DOMAIN)
    d.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(d / f"{name}-ca.pem"))
    chain = b"".join(b.bytes() for b in issued.cert_chain_pems)
    leaf_der = ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())
    return Pair(d / f"{name}-ca.pem", chain, issued.private_key_pem.bytes(), leaf_der)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Pair, Pair]:
    d = tmp_path_factory.mktemp("pairs")
    return make_pair(d, "a"), make_pair(d, "b")


class Flaky(Backend):
    """A LocalDirBackend that can be made unavailable (or broken) on demand."""

    def __init__(self, inner: LocalDirBackend) -> None:
        self.inner, self.down, self.crash_once = inner, False, False

    def _check(self) -> None:
        if self.crash_once:
            self.crash_once = False
            raise RuntimeError("unexpected bug")
        if self.down:
            raise StorageUnavailable("storage test is unavailable: down for the test")

    async def get(self, key):
        self._check()
        return await self.inner.get(key)

    async def put(self, key, data, **kw):
        return await self.inner.put(key, data, **kw)

    async def upload_file(self, key, path, **kw):
        return await self.inner.upload_file(key, path, **kw)

    def download(self, key):
        return self.inner.download(key)

    async def head(self, key):
        self._check()
        return await self.inner.head(key)

    async def list(self, prefix):
        return await self.inner.list(prefix)

    async def delete(self, keys):
        return await self.inner.delete(keys)


@pytest.fixture
def backend(tmp_path) -> Flaky:
    return Flaky(LocalDirBackend(tmp_path / "store", "pfx"))


async def put_pair(backend: Backend, cert: bytes, key: bytes) -> None:
    await backend.put(KEY_KEY, key)
    await backend.put(CERT_KEY, cert)


def served_leaf(ctx: ssl.SSLContext, ca: Path) -> bytes:
    """The DER certificate a client trusting `ca` sees in a handshake with `ctx`."""
    _, client = handshake(ctx, client_context(ca), HOST)
    return client.getpeercert(binary_form=True)


def material(backend: Backend, tmp_path: Path, changes: list | None = None) -> TLSMaterial:
    return TLSMaterial(backend, tmp_path / "data" / ".tls", 0.05,
                       on_change=(changes.append if changes is not None else None))


def records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pgsni.tls" and r.levelno == level]


async def test_load_uses_the_pair_and_keeps_a_private_copy(backend, pairs, tmp_path):
    a, _ = pairs
    await put_pair(backend, a.cert, a.key)
    changes: list = []
    m = material(backend, tmp_path, changes)
    await m.load()
    assert changes == [m]
    assert served_leaf(m.context, a.ca) == a.leaf_der
    assert ssl.PEM_cert_to_DER_cert(m.cert_pem) == a.leaf_der
    assert stat.S_IMODE(os.stat(m.directory).st_mode) == 0o700
    for path, data in ((m.cert_path, a.cert), (m.key_path, a.key)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert path.read_bytes() == data
    assert sorted(p.name for p in m.directory.iterdir()) == ["cert.pem", "key.pem"]  # no temp files


async def test_check_swaps_only_when_an_object_changes(backend, pairs, tmp_path):
    a, b = pairs
    await put_pair(backend, a.cert, a.key)
    changes: list = []
    m = material(backend, tmp_path, changes)
    await m.load()
    old = m.context
    assert await m.check() is False
    assert m.context is old and len(changes) == 1

    await put_pair(backend, b.cert, b.key)
    assert await m.check() is True
    assert len(changes) == 2 and m.context is not old
    assert served_leaf(m.context, b.ca) == b.leaf_der
    with pytest.raises(ssl.SSLCertVerificationError):
        served_leaf(m.context, a.ca)
    assert ssl.PEM_cert_to_DER_cert(m.cert_pem) == b.leaf_der
    assert served_leaf(old, a.ca) == a.leaf_der  # the old context is untouched
    assert m.cert_path.read_bytes() == b.cert and m.key_path.read_bytes() == b.key
    assert await m.check() is False


async def test_mismatched_pair_is_refused_and_logged_once(backend, pairs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgsni.tls")
    a, b = pairs
    await put_pair(backend, b.cert, b.key)
    m = material(backend, tmp_path)
    await m.load()
    ctx, pem = m.context, m.cert_pem

    await backend.put(KEY_KEY, a.key)  # B's certificate with A's key
    assert await m.check() is False  # first: maybe an upload half done
    assert len(records(caplog, logging.WARNING)) == 1 and not records(caplog, logging.ERROR)
    assert await m.check() is False
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert "cannot be used" in errors[0].getMessage() and "tls/cert.pem" in errors[0].getMessage()
    assert ".tmp-" not in errors[0].getMessage()
    assert await m.check() is False  # not retried, not logged again
    assert len(records(caplog, logging.ERROR)) == 1
    assert m.context is ctx and m.cert_pem == pem
    assert served_leaf(m.context, b.ca) == b.leaf_der
    assert m.cert_path.read_bytes() == b.cert and m.key_path.read_bytes() == b.key
    assert sorted(p.name for p in m.directory.iterdir()) == ["cert.pem", "key.pem"]

    await backend.put(CERT_KEY, a.cert)  # now a matching pair again
    assert await m.check() is True
    assert served_leaf(m.context, a.ca) == a.leaf_der


async def test_half_done_upload_only_warns_then_loads(backend, pairs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgsni.tls")
    a, b = pairs
    await put_pair(backend, a.cert, a.key)
    m = material(backend, tmp_path)
    await m.load()
    await backend.put(KEY_KEY, b.key)
    assert await m.check() is False
    await backend.put(CERT_KEY, b.cert)
    assert await m.check() is True
    assert served_leaf(m.context, b.ca) == b.leaf_der
    assert not records(caplog, logging.ERROR)


async def test_load_without_objects_says_what_to_upload(backend, pairs, tmp_path):
    a, _ = pairs
    m = material(backend, tmp_path)
    with pytest.raises(TLSConfigError) as e:
        await m.load()
    msg = str(e.value)
    assert "tls/cert.pem is not in storage" in msg
    assert "pgsni certs upload --cert" in msg
    assert "pgsni certs generate --domain db.example.com --out DIR" in msg
    assert "DIR/server.pem as tls/cert.pem" in msg and "DIR/server-key.pem as tls/key.pem" in msg
    assert m.context is None

    await backend.put(CERT_KEY, a.cert)
    with pytest.raises(TLSConfigError, match="tls/key.pem is not in storage"):
        await m.load()


async def test_load_refuses_a_mismatched_pair(backend, pairs, tmp_path):
    a, b = pairs
    await put_pair(backend, b.cert, a.key)
    m = material(backend, tmp_path)
    with pytest.raises(TLSConfigError) as e:
        await m.load()
    assert "tls/cert.pem" in str(e.value) and ".tmp-" not in str(e.value)
    assert m.context is None
    assert list(m.directory.iterdir()) == []


async def test_outage_while_polling_is_logged_and_retried(backend, pairs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgsni.tls")
    a, b = pairs
    await put_pair(backend, a.cert, a.key)
    m = material(backend, tmp_path)
    await m.load()
    ctx = m.context
    backend.down = True
    await put_pair(backend.inner, b.cert, b.key)
    assert await m.check() is False
    warnings = records(caplog, logging.WARNING)
    assert warnings and "down for the test" in warnings[-1].getMessage()
    assert m.context is ctx
    backend.down = False
    assert await m.check() is True
    assert served_leaf(m.context, b.ca) == b.leaf_der


async def test_start_up_falls_back_to_the_saved_copy(backend, pairs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgsni.tls")
    a, b = pairs
    await put_pair(backend, a.cert, a.key)
    await material(backend, tmp_path).load()  # an earlier run saved pair A

    backend.down = True
    with pytest.raises(TLSConfigError, match="cannot load the TLS certificate from storage"):
        await TLSMaterial(backend, tmp_path / "elsewhere", 0.05).load()  # nothing saved there
    m = material(backend, tmp_path)
    await m.load()
    assert served_leaf(m.context, a.ca) == a.leaf_der
    assert any("saved in" in r.getMessage() for r in records(caplog, logging.WARNING))

    await put_pair(backend.inner, b.cert, b.key)
    backend.down = False
    assert await m.check() is True
    assert served_leaf(m.context, b.ca) == b.leaf_der


async def test_poller_reloads_and_survives_unexpected_errors(backend, pairs, tmp_path, caplog):
    a, b = pairs
    await put_pair(backend, a.cert, a.key)
    m = material(backend, tmp_path)
    await m.load()
    backend.crash_once = True
    metrics = Metrics()
    task = asyncio.create_task(supervise.every("tls_reload", lambda: m.interval, m.check, metrics))
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not backend.crash_once:
                break
        assert not backend.crash_once
        assert any(r.exc_info and "tls_reload" in r.getMessage() for r in caplog.records
                   if r.name == "pgsni.background" and r.levelno == logging.ERROR)
        await put_pair(backend, b.cert, b.key)
        async with asyncio.timeout(5):
            while ssl.PEM_cert_to_DER_cert(m.cert_pem) != b.leaf_der:
                await asyncio.sleep(0.02)
        assert served_leaf(m.context, b.ca) == b.leaf_der
        assert not task.done()
        assert metrics.background_errors.labels("tls_reload")._value.get() == 1
    finally:
        await supervise.cancel_all([task])
    assert task.cancelled()


async def test_upload_checks_the_pair_first(backend, pairs, tmp_path):
    a, b = pairs
    for name, data in (("a.pem", a.cert), ("a-key.pem", a.key), ("b-key.pem", b.key)):
        (tmp_path / name).write_bytes(data)
    with pytest.raises(TLSConfigError):
        await upload(backend, tmp_path / "a.pem", tmp_path / "b-key.pem")
    assert await backend.head(CERT_KEY) is None and await backend.head(KEY_KEY) is None
    await upload(backend, tmp_path / "a.pem", tmp_path / "a-key.pem")
    assert (await backend.get(CERT_KEY))[0] == a.cert
    assert (await backend.get(KEY_KEY))[0] == a.key
