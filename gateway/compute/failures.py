"""Storage failures as a client reads them: SQLSTATEs and messages for errors of storage, and
a deadline on storage work that turns a hanging store into 57P03 in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway import errors
from storage import errors as storage_errors
from storage.errors import StorageError
from storage.leases import LeaseHeld

log = logging.getLogger("pgsni.instances")


@contextlib.asynccontextmanager
async def in_time(db_id: str, doing: str, by: float):
    """Bound storage work by loop time `by`: a store that hangs is told to the client as
    such (57P03 with the reason), in bounded time, not as a handshake that ran out."""
    try:
        async with asyncio.timeout_at(by):
            yield
    except TimeoutError:
        raise errors.storage_unavailable(db_id, f"storage did not answer in time ({doing})") from None


class storage_failures:
    """Turn storage errors into what a client should read (context manager)."""

    def __init__(self, db_id: str) -> None:
        self.db_id = db_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or not isinstance(exc, StorageError):
            return
        log.error("storage error for %s: %s", self.db_id, exc)
        if isinstance(exc, LeaseHeld):
            raise errors.GatewayError(errors.CANNOT_CONNECT_NOW, str(exc), hint=(
                "Connect through that gateway, or retry once it has stopped the database "
                "(after idle_timeout).")) from exc
        if isinstance(exc, storage_errors.StorageUnavailable):
            raise errors.storage_unavailable(self.db_id) from exc
        if isinstance(exc, storage_errors.DiskFull):
            raise errors.disk_full(self.db_id, str(exc)) from exc
        if isinstance(exc, storage_errors.CorruptArchive):
            raise errors.GatewayError(errors.DATA_CORRUPTED,
                                      f'the stored snapshot of database "{self.db_id}" is damaged',
                                      detail=str(exc), hint="The operator can roll back with "
                                      "`pgsni db restore ID --version V`.") from exc
        raise errors.GatewayError(errors.INTERNAL_ERROR, f'storage error for database "{self.db_id}"',
                                  detail=str(exc)) from exc
