"""The file list of a stored version (path -> size and sha256 of every file) as parts: each a
zstd-compressed JSON object of bounded size, named in the manifest with its own size and sha256,
so that the manifest stays small however many files a database has, and each part is read whole
within the small-object limit."""

from __future__ import annotations

import hashlib
import json

import zstandard

from .archive_format import FileEntry
from .backend import MAX_SMALL_OBJECT
from .errors import CorruptArchive

PART_BYTES = 4 << 20  # a part is closed once its JSON reaches this size (about 35,000 files)


def encode(files: dict[str, FileEntry]) -> list[tuple[bytes, int]]:
    """(compressed part, number of files in it) for each part; none for no files."""
    parts, chunk, size = [], [], 0
    for path, e in files.items():
        item = f"{json.dumps(path)}:{{\"size\":{e.size},\"sha256\":\"{e.sha256}\"}}"
        chunk.append(item)
        size += len(item) + 1
        if size >= PART_BYTES:
            parts.append(_pack(chunk))
            chunk, size = [], 0
    if chunk:
        parts.append(_pack(chunk))
    return parts


def _pack(items: list[str]) -> tuple[bytes, int]:
    raw = ("{" + ",".join(items) + "}").encode()
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw), len(items)


def decode(data: bytes, ref: dict) -> dict[str, FileEntry]:
    """The files of one part, checked against its entry in the manifest (`ref`: size, sha256,
    count). Refuses a part that inflates beyond the small-object limit."""
    name = ref.get("key", "file list part")
    if len(data) != ref["size"] or hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise CorruptArchive(f"{name} does not match its size and sha256 in the manifest")
    try:
        inflated = zstandard.frame_content_size(data)
        if not 0 <= inflated <= MAX_SMALL_OBJECT:  # -1: not recorded, which we always do
            raise CorruptArchive(f"{name} inflates to an unknown or too large size")
        raw = json.loads(zstandard.ZstdDecompressor().decompress(data))
        files = {p: FileEntry(int(e["size"]), str(e["sha256"])) for p, e in raw.items()}
    except (zstandard.ZstdError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CorruptArchive(f"{name} is not valid: {e}") from None
    if len(files) != ref["count"]:
        raise CorruptArchive(f"{name} lists {len(files)} files, the manifest says {ref['count']}")
    return files
