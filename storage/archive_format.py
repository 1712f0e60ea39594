"""What both sides of a snapshot archive share: the entries a manifest lists, stream wrappers
that count and hash what passes through them, and the rule for which symlinks are safe."""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 256 << 10  # file data is copied in pieces of this size


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str  # hex


@dataclass(frozen=True)
class ArchiveInfo:
    files: dict[str, FileEntry]  # relative POSIX paths of regular files -> entry
    size: int  # bytes of the compressed archive written
    sha256: str  # hex sha256 of the compressed archive bytes


class HashingReader:
    """Wraps a readable binary stream: read(n) passes through, counting `bytes` and feeding
    `sha256` (a hashlib object) with everything returned."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.bytes += len(data)
            self.sha256.update(data)
        return data


class HashingWriter:
    """Wraps a writable binary stream: write(b) passes through (retrying short writes),
    counting `bytes` and feeding `sha256` with everything written."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        while done < total:
            n = self.raw.write(view[done:])
            if n == 0:
                raise OSError(errno.EIO, "the archive output accepted no bytes")
            done += total - done if n is None else n  # None: a writer that returns nothing
        self.bytes += total
        self.sha256.update(view)
        return total

    def flush(self) -> None:
        flush = getattr(self.raw, "flush", None)
        if flush is not None:
            flush()


def _symlink_problem(rel: str, link: str) -> str | None:
    """Why the symlink at `rel` (relative to the tree's root) pointing at `link` is unsafe,
    or None. Allowed: a relative target made of some leading ".." (no more than the link's
    depth) followed by plain names. Refusing ".." after a name makes the rule hold however
    the names resolve: with "x/up -> .." in the tree, "y -> x/up/../.." looks inside when
    read as text but resolves outside."""
    if not link or "\x00" in link:
        return "has an empty target or one containing NUL"
    if link.startswith("/"):
        return "points to an absolute path"
    parts = [p for p in link.split("/") if p not in ("", ".")]
    ups = 0
    for index, part in enumerate(parts):
        if part == "..":
            if index != ups:
                return "has '..' after a name in its target"
            ups += 1
    if ups > rel.count("/"):
        return "points outside the directory"
    return None
