"""Storage errors. Every one carries a message fit for an operator (and, trimmed, a client)."""


class StorageError(Exception):
    """Base class for everything that can go wrong with database storage."""


class NotFound(StorageError):
    """The object (or database) does not exist in storage."""


class PreconditionFailed(StorageError):
    """A conditional write lost a race: someone else changed the object first."""


class StorageUnavailable(StorageError):
    """The store could not be reached (after bounded retries), or answered with errors."""


class UnsafeArchive(StorageError):
    """An archive tried to write outside its target, held a device file, or grew too big."""


class CorruptArchive(StorageError):
    """An archive's bytes do not match its manifest (checksum, size, or file list)."""
