"""Snapshot archives: a PGDATA directory as a zstd-compressed tar with per-file sha256, written
and read strictly as streams. Creating is here; checked extraction, which refuses anything that
could land outside its target, is in storage/extract.py and re-exported."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from .archive_format import CHUNK as _CHUNK
from .archive_format import ArchiveInfo, FileEntry, HashingReader, HashingWriter, _symlink_problem
from .errors import StorageError
from .extract import extract, find_pgdata_root, refuse_tablespaces

__all__ = ["EXCLUDE", "ArchiveInfo", "FileEntry", "HashingReader", "HashingWriter", "create",
           "extract", "find_pgdata_root", "refuse_tablespaces"]

# Relative paths never archived. An entry ending in "/" excludes that directory's *contents*
# (the directory itself is kept, as Postgres expects it to exist).
EXCLUDE: frozenset[str] = frozenset({"postmaster.pid", "postmaster.opts", "pg_stat_tmp/"})


# --- creating -----------------------------------------------------------------------------------
def create(pgdata: Path, out: BinaryIO, *, level: int = 3) -> ArchiveInfo:
    """Write a zstd-compressed tar of everything under `pgdata` (minus EXCLUDE) to `out`, in a
    deterministic order, reading every file once. Postgres must be stopped: a file that
    vanishes or changes size while being read is an error. On any error the bytes already
    written to `out` are not a valid archive (the zstd frame is left unfinished)."""
    pgdata = Path(pgdata)
    try:
        if not stat.S_ISDIR(os.stat(pgdata).st_mode):
            raise StorageError(f"{pgdata} is not a directory")
    except OSError as e:
        raise StorageError(f"cannot archive {pgdata}: {e.strerror}") from None
    sink = HashingWriter(out)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    zwriter = compressor.stream_writer(sink, closefd=False)
    tar = tarfile.open(fileobj=zwriter, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_CHUNK)
    tar.copybufsize = _CHUNK
    # No `with`: on an error the end-of-archive marker and the frame end must NOT be written,
    # so a half-made archive can never pass for a complete one.
    try:
        files = _add_tree(tar, pgdata)
    except BaseException:
        # nor may tarfile flush its buffer when it is garbage-collected (into a closed file)
        tar.closed = tar.fileobj.closed = True  # type: ignore[union-attr]
        raise
    tar.close()
    zwriter.close()  # ends the zstd frame (with its checksum); closefd=False leaves `out` open
    sink.flush()
    return ArchiveInfo(files, sink.bytes, sink.sha256.hexdigest())


def _add_tree(tar: tarfile.TarFile, pgdata: Path) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for rel, dir_fd, name, st in _walk(pgdata):
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        elif stat.S_ISLNK(st.st_mode):
            try:
                link = os.readlink(name, dir_fd=dir_fd)
            except OSError as e:
                raise _source_error(rel, e) from None
            reason = _symlink_problem(rel, link)
            if reason:
                raise StorageError(f"cannot archive symlink {rel} -> {link}: it {reason} "
                                   f"(tablespaces and a pg_wal outside PGDATA are not supported)")
            info.type = tarfile.SYMTYPE
            info.linkname = link
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            files[rel] = _add_file(tar, info, rel, dir_fd, name)
        else:
            raise StorageError(f"cannot archive {rel}: it is a {_kind(st.st_mode)}, not a regular "
                               f"file, directory or symlink")
    return files


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(root: Path, rel_dir: str = "", parent_fd: int | None = None,
          ) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """(relative path, descriptor of its directory, name, lstat) of everything under root,
    depth first with each directory's entries sorted by name: a directory comes right before
    its contents. Each directory is opened relative to its parent's descriptor, never through
    a symlink: a directory swapped for a link meanwhile (by a process an allowed superuser
    left behind) is an error, not a way to archive what the link points at."""
    try:
        if parent_fd is None:  # the root is the caller's: it may be reached through a link
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = os.open(rel_dir.rsplit("/", 1)[-1], _OPEN_DIR, dir_fd=parent_fd)
    except OSError as e:
        raise _source_error(rel_dir or ".", e) from None
    try:
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise _source_error(rel_dir or ".", e) from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _excluded(rel):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                raise _source_error(rel, e) from None
            yield rel, fd, entry.name, st
            if stat.S_ISDIR(st.st_mode):
                yield from _walk(root, rel, fd)
    finally:
        os.close(fd)


def _excluded(rel: str) -> bool:
    if rel in EXCLUDE:
        return True
    return any(e.endswith("/") and rel.startswith(e) for e in EXCLUDE)


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, rel: str, dir_fd: int, name: str) -> FileEntry:
    try:
        # O_NONBLOCK: if the file was swapped for a fifo since the walk, don't hang opening it
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise _source_error(rel, e) from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"cannot archive {rel}: it changed while being archived "
                               f"(is Postgres still running?)")
        info.size = st.st_size
        reader = _SourceFile(f, rel, st.st_size)
        tar.addfile(info, reader)
        if f.read(1):
            raise StorageError(f"cannot archive {rel}: it grew while being archived "
                               f"(is Postgres still running?)")
    return FileEntry(reader.bytes, reader.sha256.hexdigest())


class _SourceFile(HashingReader):
    """A file being archived: hashes what tarfile reads and reports a short file (one that
    shrank since its size was taken) as a StorageError naming it."""

    def __init__(self, raw: BinaryIO, rel: str, size: int) -> None:
        super().__init__(raw)
        self.rel, self.size = rel, size

    def read(self, n: int = -1) -> bytes:
        try:
            data = super().read(n)
        except OSError as e:
            raise _source_error(self.rel, e) from None
        if 0 <= n and len(data) < n and self.bytes < self.size:
            raise StorageError(f"cannot archive {self.rel}: it shrank while being archived "
                               f"(is Postgres still running?)")
        return data


def _source_error(rel: str, e: OSError) -> StorageError:
    if isinstance(e, FileNotFoundError):
        return StorageError(f"cannot archive {rel}: it vanished while being archived "
                            f"(is Postgres still running?)")
    return StorageError(f"cannot archive {rel}: {e.strerror or e}")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
