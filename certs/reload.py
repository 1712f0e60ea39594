"""TLS material kept in storage (`tls/cert.pem`, `tls/key.pem`): loaded before the gateway
listens, then polled by etag and swapped in for new connections; a bad new pair is refused."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
from pathlib import Path
from typing import Callable

from storage.atomic import fsync_dir
from storage.backend import Backend
from storage.errors import NotFound, StorageError, StorageUnavailable

from .context import TLSConfigError, leaf_certificate_pem, server_context

log = logging.getLogger("pgsni.tls")

CERT_KEY = "tls/cert.pem"
KEY_KEY = "tls/key.pem"
CACHE_DIR = ".tls"  # under data_root: the `directory` of the gateway's TLSMaterial


def missing_message(where: str, missing: str, domain: str) -> str:
    return (f"tls_from_storage is on but {missing} is not in storage {where}. Upload the "
            f"certificate chain as {CERT_KEY} and its private key as {KEY_KEY} (keys relative "
            "to the storage prefix), e.g. `pgsni certs upload --cert server.pem --key "
            f"server-key.pem`; for development, `pgsni certs generate --domain {domain} --out DIR` "
            f"and upload DIR/server.pem as {CERT_KEY} and DIR/server-key.pem as {KEY_KEY}")


class TLSMaterial:
    """The gateway's current SSLContext and leaf certificate (for channel binding), loaded from
    `backend`. Each accepted pair is also written to `directory` (0700; files 0600), which
    load_cert_chain needs and which serves as a fallback if storage is down at start-up.
    `on_change(self)` is called whenever a new pair is in use (including the first)."""

    def __init__(self, backend: Backend, directory: Path, interval: float, *,
                 on_change: Callable[["TLSMaterial"], None] | None = None,
                 domain: str = "db.example.com") -> None:
        self.backend, self.directory, self.interval = backend, Path(directory), interval
        self.on_change, self.domain = on_change, domain
        self.context: ssl.SSLContext | None = None
        self.cert_pem: str | None = None
        self.etags: tuple[str, str] | None = None  # (cert, key) of the pair in use
        self._bad: tuple[str, str] | None = None  # a pair reported as an error; not retried
        self._suspect: tuple[str, str] | None = None  # failed once: maybe an upload half done
        self._absent_logged = False

    @property
    def cert_path(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "key.pem"

    # --- start-up ------------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the pair before the gateway listens; TLSConfigError if there is none to use.
        If storage is unreachable, the copy saved by an earlier run is used (with a warning)."""
        where = self.backend.describe()
        try:
            cert, cert_etag = await self.backend.get(CERT_KEY)
            key, key_etag = await self.backend.get(KEY_KEY)
        except NotFound as e:
            missing = CERT_KEY if await self._absent(CERT_KEY) else KEY_KEY
            raise TLSConfigError(missing_message(where, missing, self.domain)) from e
        except StorageUnavailable as e:
            if not (self.cert_path.is_file() and self.key_path.is_file()):
                raise TLSConfigError(f"cannot load the TLS certificate from storage {where}: {e}") from None
            ctx, pem = await asyncio.to_thread(_build, self.cert_path, self.key_path)
            log.warning("storage %s is unavailable (%s); using the TLS certificate saved in %s "
                        "until it is back", where, e, self.directory)
            self._install(ctx, pem, None)
            return
        except StorageError as e:
            raise TLSConfigError(f"cannot load the TLS certificate from storage {where}: {e}") from None
        ctx, pem = await asyncio.to_thread(self._save, cert, key)  # TLSConfigError if bad
        self._install(ctx, pem, (cert_etag, key_etag))
        log.info("TLS certificate loaded from %s (%s)", where, CERT_KEY)

    async def _absent(self, key: str) -> bool:
        try:
            return await self.backend.head(key) is None
        except StorageError:
            return True

    # --- reloading -----------------------------------------------------------------------------
    async def check(self) -> bool:
        """One round: if either object's etag changed, load and validate the new pair and swap
        it in. True if a new pair is now in use. Storage errors are logged, never raised."""
        where = self.backend.describe()
        try:
            cert_info = await self.backend.head(CERT_KEY)
            key_info = await self.backend.head(KEY_KEY)
        except StorageError as e:
            log.warning("cannot check the TLS certificate in storage %s (retrying in %gs): %s",
                        where, self.interval, e)
            return False
        if cert_info is None or key_info is None:
            if not self._absent_logged:
                self._absent_logged = True
                log.warning("%s is missing from storage %s; keeping the current TLS certificate",
                            CERT_KEY if cert_info is None else KEY_KEY, where)
            return False
        self._absent_logged = False
        if (cert_info.etag, key_info.etag) in (self.etags, self._bad):
            return False
        try:
            cert, cert_etag = await self.backend.get(CERT_KEY)
            key, key_etag = await self.backend.get(KEY_KEY)
        except NotFound:
            return False  # deleted since head(); the next round reports it
        except StorageError as e:
            log.warning("cannot read the TLS certificate from storage %s (retrying in %gs): %s",
                        where, self.interval, e)
            return False
        etags = (cert_etag, key_etag)
        if etags in (self.etags, self._bad):
            return False
        try:
            ctx, pem = await asyncio.to_thread(self._save, cert, key)
        except TLSConfigError as e:
            if etags != self._suspect:  # the two objects are written one after the other
                self._suspect = etags
                log.warning("the new TLS certificate in %s does not load yet (retrying in %gs, "
                            "in case an upload is half done): %s", where, self.interval, e)
            else:
                self._bad = etags
                log.error("the new TLS certificate in %s cannot be used; keeping the current "
                          "one until %s or %s changes: %s", where, CERT_KEY, KEY_KEY, e)
            return False
        self._install(ctx, pem, etags)
        log.info("TLS certificate reloaded from %s; new connections use it", where)
        return True

    # --- internals -----------------------------------------------------------------------------
    def _install(self, ctx: ssl.SSLContext, pem: str, etags: tuple[str, str] | None) -> None:
        self.context, self.cert_pem, self.etags = ctx, pem, etags
        self._suspect = self._bad = None
        if self.on_change is not None:
            self.on_change(self)

    def _save(self, cert: bytes, key: bytes) -> tuple[ssl.SSLContext, str]:
        """Write the pair to temp files, build the context from them (which checks that the
        key matches the certificate), then rename them into place: the saved pair is always
        one that loaded. A pair that fails leaves nothing behind."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        tag = secrets.token_hex(6)
        tmp_cert = self.directory / f".cert.pem.tmp-{tag}"
        tmp_key = self.directory / f".key.pem.tmp-{tag}"
        try:
            _write_private(tmp_cert, cert)
            _write_private(tmp_key, key)
            try:
                ctx, pem = _build(tmp_cert, tmp_key)
            except TLSConfigError as e:  # name the objects, not our temp files
                raise TLSConfigError(str(e).replace(str(tmp_cert), CERT_KEY)
                                     .replace(str(tmp_key), KEY_KEY)) from None
            os.replace(tmp_key, self.key_path)
            os.replace(tmp_cert, self.cert_path)
            fsync_dir(self.directory)
        finally:
            for tmp in (tmp_cert, tmp_key):
                tmp.unlink(missing_ok=True)
        return ctx, pem


def _build(cert: Path, key: Path) -> tuple[ssl.SSLContext, str]:
    ctx = server_context(cert, key)
    try:
        pem = leaf_certificate_pem(cert)
    except ValueError:  # a BEGIN without an END
        raise TLSConfigError(f"{cert} holds no complete PEM certificate") from None
    return ctx, pem


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def upload(backend: Backend, cert: Path, key: Path) -> None:
    """Check that `key` matches `cert` and upload them as tls/key.pem and tls/cert.pem."""
    await asyncio.to_thread(_build, cert, key)  # TLSConfigError if the pair is unusable
    await backend.put(KEY_KEY, key.read_bytes())
    await backend.put(CERT_KEY, cert.read_bytes())
