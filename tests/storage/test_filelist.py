"""File list parts: a round trip, parts of bounded size, and parts that do not match their
manifest entry or would inflate beyond the small-object limit are refused."""

from __future__ import annotations

import hashlib

import pytest
import zstandard

from storage import filelist
from storage.archive_format import FileEntry
from storage.errors import CorruptArchive


def _ref(data: bytes, count: int) -> dict:
    return {"key": "k", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "count": count}


def test_parts_round_trip_and_stay_near_their_size(monkeypatch):
    monkeypatch.setattr(filelist, "PART_BYTES", 10_000)
    files = {f"base/1/{i}\u00e9\udcff": FileEntry(i, f"{i:064x}") for i in range(1000)}
    parts = filelist.encode(files)
    assert len(parts) > 5
    back = {}
    for data, count in parts:
        assert len(zstandard.ZstdDecompressor().decompress(data)) < 10_000 + 200
        back.update(filelist.decode(data, _ref(data, count)))
    assert back == files
    assert filelist.encode({}) == []


def test_a_part_is_checked_against_its_manifest_entry():
    (data, count), = filelist.encode({"a": FileEntry(1, "0" * 64)})
    with pytest.raises(CorruptArchive, match="size and sha256"):
        filelist.decode(data + b"x", _ref(data, count))
    with pytest.raises(CorruptArchive, match="lists 1 files, the manifest says 2"):
        filelist.decode(data, _ref(data, 2))


@pytest.mark.parametrize("blob", [
    zstandard.ZstdCompressor().compress(b"{" + b" " * (filelist.MAX_SMALL_OBJECT + 1) + b"}"),
    zstandard.ZstdCompressor(write_content_size=False).compress(b"{}"),
    zstandard.ZstdCompressor().compress(b"[1, 2]"),
    zstandard.ZstdCompressor().compress(b'{"a": {"size": 1}}'),
    b"not zstd",
])
def test_hostile_or_broken_parts_are_corrupt(blob):
    with pytest.raises(CorruptArchive):
        filelist.decode(blob, _ref(blob, 1))
