"""Storage errors. Every one carries a message fit for an operator (and, trimmed, a client)."""

import contextlib
import errno
from typing import Iterator


class StorageError(Exception):
    """Base class for everything that can go wrong with database storage."""


class NotFound(StorageError):
    """The object (or database) does not exist in storage."""


class PreconditionFailed(StorageError):
    """A conditional write lost a race: someone else changed the object first."""


class StorageUnavailable(StorageError):
    """The store could not be reached (after bounded retries), or answered with errors."""


class LeaseLost(StorageUnavailable):
    """This gateway no longer holds the database's lease (its heartbeat lapsed): another
    gateway may have taken the database over, so nothing of it in storage may change from here
    until the lease is claimed again."""


class UnsafeArchive(StorageError):
    """An archive tried to write outside its target, held a device file, or grew too big."""


class CorruptArchive(StorageError):
    """An archive's bytes do not match its manifest (checksum, size, or file list)."""


class CopyError(StorageError):
    """`cp -a` of a data directory failed (storage/local.py `copy_tree`): the message is cp's
    last line; `stderr` all it said; `disk_full` whether the disk or a quota was full."""

    def __init__(self, reason: str, stderr: str = "", disk_full: bool = False) -> None:
        super().__init__(reason)
        self.stderr, self.disk_full = stderr, disk_full


class DiskFull(StorageError):
    """The local disk (the data root) has no space left for a database copy."""


@contextlib.contextmanager
def disk_full_as(what: str) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside the block into DiskFull naming `what`."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the data root for {what}") from e
        raise
