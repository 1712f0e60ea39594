"""Which stored versions a restore to an LSN tries (gateway/compute/pitr.py), from WAL listings
alone: fabricated WAL objects in a local directory store, no Postgres."""

from __future__ import annotations

import datetime as dt
import struct

import pytest
import zstandard

from gateway.compute import pitr
from gateway.compute.walrestore import OutOfReach
from storage.localdir import LocalDirBackend
from storage.snapshots import Manifest, SnapshotStore
from storage.wal import WalStore, parse_lsn, segment_name

SEG = 16 << 20
V1, V2, V3 = "20261201T000000.000Z-000001", "20261202T000000.000Z-000002", "20261203T000000.000Z-000003"


def _page(seg_size: int) -> bytes:
    """The long page header a WAL segment begins with (magic, info, timeline, address, rem_len,
    padding, system id, segment size, block size)."""
    return struct.pack("=HHIQI4xQII", 0xD110, 2, 1, 0, 0, 7, seg_size, 8192)


@pytest.fixture
def store(tmp_path):
    return SnapshotStore(LocalDirBackend(tmp_path / "store", "pfx"), tmp_path / "spool")


async def version(store: SnapshotStore, v: str, base_backup: dict | None = None) -> None:
    """A stored version: a stop-time snapshot, or with `base_backup` (as its manifest holds it)
    an online base backup."""
    b = store.backend
    await b.put(f"dbs/db/versions/{v}.tar.zst", b"x")
    m = Manifest("db", v, dt.datetime.now(dt.timezone.utc).isoformat(), "15", {},
                 {"key": f"dbs/db/versions/{v}.tar.zst", "size": 1, "sha256": "", "compression": "zstd"},
                 {"count": 0, "parts": []}, base_backup=base_backup, format=3 if base_backup else 2)
    await b.put(f"dbs/db/versions/{v}.json", m.to_json())


async def wal(store: SnapshotStore, v: str, tli: int, segno: int, length: int | None = None) -> None:
    """A stored WAL object under version `v`: segment `segno` whole, or its first `length` bytes."""
    w = WalStore(store.backend, "db", base=v)
    head = _page(SEG) + bytes(64)
    name = segment_name(tli, segno)
    key = w.segment_key(name) if length is None else w.partial_key(name, length)
    await store.backend.put(key, zstandard.ZstdCompressor().compress(head))


async def test_segment_size_comes_from_the_page_header(store):
    for size in (1 << 20, 16 << 20, 64 << 20):
        await store.backend.put(f"k{size}", zstandard.ZstdCompressor().compress(_page(size) + bytes(100)))
        assert await pitr.segment_size(store.backend, f"k{size}") == size
    await store.backend.put("junk", zstandard.ZstdCompressor().compress(b"no header"))
    assert await pitr.segment_size(store.backend, "junk") == 16 << 20


async def test_the_newest_version_first_then_older_runs_that_pass_the_lsn(store):
    # V1 ran through segments 1-2 and was saved as V2 in segment 3 (at 0/3000100); V2 ran on
    # to the middle of segment 3 and was saved as V3, which has no WAL yet
    for v in (V1, V2, V3):
        await version(store, v)
    await wal(store, V1, 1, 1)
    await wal(store, V1, 1, 2)
    await wal(store, V1, 1, 3, 0x100)
    await wal(store, V2, 1, 3, 0x80000)
    names = lambda found: [m.version for m in found]  # noqa: E731
    # in segment 3, before V2's end: V2 first, then V1 (whose WAL passes it)
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/3000050"))) == [V2, V1]
    # past V1's WAL: V2 alone
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/3000200"))) == [V2]
    # in V1's run only
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/2000010"))) == [V1]
    with pytest.raises(OutOfReach, match="before the WAL storage holds"):
        await pitr.bases_for_lsn(store, "db", parse_lsn("0/10"))
    with pytest.raises(OutOfReach, match="beyond the WAL storage holds"):
        await pitr.bases_for_lsn(store, "db", parse_lsn("0/3080000"))
    # a database running here ships the rest when it stops: not refused yet
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/3080000"), growing=True)) == [V2]


async def test_an_online_base_backup_is_a_base_for_the_lsns_past_its_end(store):
    """An online base backup (V2, taken while V1's copy ran) has no WAL of its own: what it
    replays is under V1's prefix, from its start. It is the newest base for an LSN past its
    end, and still one once retention removed V1 and kept V1's WAL from V2's start on
    (storage/snapshots.py)."""
    await version(store, V1)
    await version(store, V2, base_backup={"wal": V1, "timeline": 1, "start_lsn": "0/3000028",
                                          "end_lsn": "0/3000100", "checkpoint_lsn": "0/3000060",
                                          "segment_size": SEG})
    for n in (1, 2, 3, 4):
        await wal(store, V1, 1, n)
    await wal(store, V1, 1, 5, 0x100)
    names = lambda found: [m.version for m in found]  # noqa: E731
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/4000010"))) == [V2, V1]
    # before the base backup's end (its first consistent point): V1 alone
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/3000050"))) == [V1]

    store.keep_last = 1
    assert await store.prune("db") == [V1]
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/4000010"))) == [V2]
    assert names(await pitr.bases_for_lsn(store, "db", parse_lsn("0/5000010"))) == [V2]
    with pytest.raises(OutOfReach, match="before the WAL storage holds"):
        await pitr.bases_for_lsn(store, "db", parse_lsn("0/3000050"))
    with pytest.raises(OutOfReach, match="beyond the WAL storage holds"):
        await pitr.bases_for_lsn(store, "db", parse_lsn("0/5000100"))
