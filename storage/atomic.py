"""Atomic file writes: the data goes to a fresh temp file beside the target (mode 0600),
is fsynced, and only then renamed over the target, so a reader sees the old or the new.
`fsync_dir` makes a rename or creation in a directory durable."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A hidden, unique temp name in the target's directory (same file system: rename works)."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def write_temp(path: Path, data: bytes) -> tuple[Path, os.stat_result]:
    """Write `data` to a new temp file beside `path` and fsync it; the caller renames it.
    Returns the temp path and its stat (rename keeps inode and mtime). Nothing is left
    behind on failure."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        return tmp, os.fstat(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> os.stat_result:
    """Replace `path` with `data` atomically; returns the stat of the written file."""
    tmp, st = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return st


def fsync_dir(d: Path) -> None:
    """fsync directory `d`, so that renames and creations in it survive a power loss. A file
    system that cannot sync a directory (EINVAL: some FUSE mounts) is let be."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)

