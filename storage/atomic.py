"""Atomic file writes: the data goes to a fresh temp file beside the target (mode 0600),
is fsynced, and only then renamed over the target, so a reader sees the old or the new.
And durability: `fsync_dir` after a rename or creation in a directory, `sync_tree` for a
whole tree written without fsyncs."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import secrets
import shutil
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


def _load_syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs  # Linux; glibc and musl have it
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def sync_tree(root: Path) -> None:
    """Make every file and directory under `root` (and `root` itself) durable; not its entry
    in its parent (fsync_dir the parent after renaming it into place).

    Where the C library has it, this is one syncfs(2) of the file system holding `root`:
    a restored copy has hundreds to thousands of files, and fsyncing each costs a journal
    commit apiece, while syncfs writes them all back at once. It also flushes what other
    writers left dirty on that file system, work they owe the disk anyway (Postgres offers
    the same trade as recovery_init_sync_method=syncfs). It reports write-back errors from
    Linux 5.8 on. Elsewhere, or if the call fails as unsupported, each file and directory
    is fsynced. Extraction itself does not fsync as it writes: it stays a plain writer,
    and one sync at the end is cheaper than one per file."""
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs(fd) == 0:
                return
            err = ctypes.get_errno()
        finally:
            os.close(fd)
        if err not in (errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(root))
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue  # a symlink is an entry in its directory, synced with it
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


async def remove_tree(path: Path) -> None:
    """Remove a whole directory tree (a database copy, a build) in a thread: thousands of
    unlinks must not stall the event loop that relays every client. Missing is fine."""
    await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
