"""WAL objects in storage (storage/wal.py), on a local directory and on S3 (moto): immutable
uploads, partial segments superseded by longer ones, what a restore fetches along the timeline
history, holes refused, retention."""

from __future__ import annotations

import os

import pytest

from storage.wal import (StoredWal, WalConflict, WalGap, WalStore, format_lsn, history_name,
                         parse_lsn, parse_segment_name, segment_name)

from .test_backends import backend  # noqa: F401  (the fixture: local directory and S3)

SEG = 1 << 20  # Postgres' smallest segment size keeps these tests small


def seg(tli: int, segno: int) -> str:
    return segment_name(tli, segno, SEG)


def content(tag: int) -> bytes:
    return bytes([tag]) * 100 + os.urandom(1000) + bytes(SEG - 1100)


@pytest.fixture
def store(backend):  # noqa: F811
    return WalStore(backend, "db1", segment_size=SEG)


def test_names_and_lsns():
    assert segment_name(1, 0x100 + 0xFF, 16 << 20) == "0000000100000001000000FF"
    assert parse_segment_name("0000000200000001000000FF", 16 << 20) == (2, 0x1FF)
    assert parse_segment_name("000000010000000100000001.partial") is None
    assert parse_lsn("1/2A0") == (1 << 32) | 0x2A0 and format_lsn((1 << 32) | 0x2A0) == "1/2A0"
    assert history_name(3) == "00000003.history"


async def test_segments_round_trip_and_are_immutable(store, tmp_path):
    first = content(1)
    key = await store.put_segment(seg(1, 1), first)
    assert key == f"dbs/db1/wal/{seg(1, 1)}.zst"
    assert await store.read(key) == first
    await store.put_segment(seg(1, 1), first)  # a retry, or a restarted shipper: the same bytes
    with pytest.raises(WalConflict):
        await store.put_segment(seg(1, 1), content(2))
    assert await store.read(key) == first  # never replaced
    assert await store.newest() == (1, 2 * SEG)
    fetched = await store.fetch(tmp_path, start_lsn=SEG + 10)
    assert fetched.files == [seg(1, 1)] and fetched.end == 2 * SEG
    assert (tmp_path / seg(1, 1)).read_bytes() == first



async def test_pieces_follow_one_another_and_a_restore_assembles_them(store, tmp_path):
    """The shipper stores a segment being written as pieces (what arrived since the last
    upload); a restore joins those that reach furthest from the start without a hole."""
    whole = content(5)
    await store.put_segment(seg(1, 1), content(6))
    first = await store.put_partial(seg(1, 2), whole[:3000])
    second = await store.put_partial(seg(1, 2), whole[3000:7000], start=3000)
    assert second == f"dbs/db1/wal/{seg(1, 2)}.00000BB8-00001B58.partial.zst"
    with pytest.raises(WalConflict):  # the same range with other bytes: another writer
        await store.put_partial(seg(1, 2), b"x" * 4000, start=3000)
    await store.put_partial(seg(1, 2), whole[8000:9000], start=8000)  # beyond a hole: not reached
    listing = await store.listing()
    assert listing.cover(1, 2)[0] == 7000 and listing.newest() == (1, 2 * SEG + 7000)
    assert listing.superseded() == []  # pieces that join are all needed; the one past the hole too
    fetched = await store.fetch(tmp_path, start_lsn=SEG)
    assert fetched.end == 2 * SEG + 7000
    assert (tmp_path / seg(1, 2)).read_bytes() == whole[:7000] + bytes(SEG - 7000)

    joined = await store.put_partial(seg(1, 2), whole[:7000])  # one from the start replaces them
    listing = await store.listing()
    assert sorted(listing.superseded()) == sorted([first, second])
    assert [key for _, _, key in listing.cover(1, 2)[1]] == [joined]

    await store.put_partial(seg(1, 2), whole[7000:], start=7000)  # pieces that reach its end:
    listing = await store.listing()  # the segment is complete, and a restore goes on past it
    await store.put_partial(seg(1, 3), whole[:100])
    assert (await store.listing()).newest() == (1, 3 * SEG + 100)
    fetched = await store.fetch(tmp_path, start_lsn=SEG)
    assert fetched.files == [seg(1, 1), seg(1, 2), seg(1, 3)] and fetched.end == 3 * SEG + 100
    assert (tmp_path / seg(1, 2)).read_bytes() == whole

async def test_partials_are_superseded_and_padded(store, tmp_path):
    whole = content(3)
    await store.put_segment(seg(1, 1), content(4))
    short = await store.put_partial(seg(1, 2), whole[:5000])
    await store.put_partial(seg(1, 2), whole[:5000])  # the same again: fine
    with pytest.raises(WalConflict):
        await store.put_partial(seg(1, 2), whole[:4999] + b"x")
    longer = await store.put_partial(seg(1, 2), whole[:9000])
    listing = await store.listing()
    assert listing.newest() == (1, 2 * SEG + 9000)
    assert listing.superseded() == [short]

    fetched = await store.fetch(tmp_path, start_lsn=SEG)
    assert fetched.files == [seg(1, 1), seg(1, 2)] and fetched.end == 2 * SEG + 9000
    assert (tmp_path / seg(1, 2)).read_bytes() == whole[:9000] + bytes(SEG - 9000)

    await store.put_segment(seg(1, 2), whole)
    assert sorted((await store.listing()).superseded()) == sorted([short, longer])
    assert await store.remove_superseded() == 2
    assert await store.newest() == (1, 3 * SEG)


async def test_a_hole_is_refused(store, tmp_path):
    for n in (1, 2, 4):
        await store.put_segment(seg(1, n), content(n))
    with pytest.raises(WalGap, match="hole"):
        await store.fetch(tmp_path, start_lsn=SEG)
    fetched = await store.fetch(tmp_path, start_lsn=SEG, until_lsn=2 * SEG + 100)
    assert fetched.files == [seg(1, 1), seg(1, 2)]
    with pytest.raises(WalGap, match="up to"):
        await store.fetch(tmp_path, start_lsn=SEG, until_lsn=3 * SEG + 100)
    await store.put_partial(seg(1, 5), b"\x01" * 100)
    with pytest.raises(WalGap, match="before"):  # the target lies past the stored end
        await store.fetch(tmp_path, start_lsn=4 * SEG, until_lsn=5 * SEG + 500)


async def test_fetch_follows_the_timeline_history(store, tmp_path):
    """Timeline 2 left timeline 1 inside segment 3: a replay reads 1 and 2 from timeline 1 and
    3 and 4 from timeline 2; timeline 1's own segment 3 and 4 (written on after the fork) are
    not what the newest history needs."""
    for n in (1, 2, 3, 4):
        await store.put_segment(seg(1, n), content(10 + n))
    for n in (3, 4):
        await store.put_segment(seg(2, n), content(20 + n))
    switch = 3 * SEG + 0x1234
    await store.put_history(history_name(2), f"1\t{format_lsn(switch)}\tbefore 2000-01-01\n".encode())
    (tmp_path / "a").mkdir()
    fetched = await store.fetch(tmp_path / "a", start_lsn=SEG)
    assert fetched.timeline == 2 and fetched.end == 5 * SEG
    assert fetched.files == [history_name(2), seg(1, 1), seg(1, 2), seg(2, 3), seg(2, 4)]
    assert (tmp_path / "a" / seg(2, 3)).read_bytes()[:100] == bytes([23]) * 100

    (tmp_path / "b").mkdir()
    old = await store.fetch(tmp_path / "b", start_lsn=SEG, timeline=1)
    assert old.files == [history_name(2), seg(1, 1), seg(1, 2), seg(1, 3), seg(1, 4)]

    with pytest.raises(WalGap, match="not on the history"):  # a base past the fork on timeline 1
        await store.fetch(tmp_path / "b", start_lsn=4 * SEG, base_timeline=1)
    await store.fetch(tmp_path / "b", start_lsn=2 * SEG, base_timeline=1)  # before it: fine

    await store.backend.delete([store.prefix + history_name(2)])
    with pytest.raises(WalGap, match="history"):
        await store.fetch(tmp_path / "b", start_lsn=SEG)


async def test_a_hole_before_a_later_timeline_or_at_a_segments_end_is_refused(store, tmp_path):
    """Timeline 2 begins where segment 3 begins: a replay reads 1 and 2 from timeline 1, then
    3 and 4 from timeline 2. Timeline 1's segment 2 missing is a hole before timeline 2's
    WAL, not the end of the stored WAL. So is a segment whose pieces stop short of its end
    while the next segment is stored."""
    for n in (1, 2):
        await store.put_segment(seg(1, n), content(10 + n))
    for n in (3, 4):
        await store.put_segment(seg(2, n), content(20 + n))
    await store.put_history(history_name(2), f"1\t{format_lsn(3 * SEG)}\tno recovery target\n".encode())
    fetched = await store.fetch(tmp_path, start_lsn=SEG)
    assert fetched.files == [history_name(2), seg(1, 1), seg(1, 2), seg(2, 3), seg(2, 4)]
    await store.backend.delete([store.segment_key(seg(1, 2))])
    with pytest.raises(WalGap, match="hole"):
        await store.fetch(tmp_path, start_lsn=SEG)

    other = WalStore(store.backend, "db1", segment_size=SEG, base="20261203T120000.000Z-aaaaaa")
    whole = content(5)
    await other.put_segment(seg(1, 1), content(6))
    await other.put_partial(seg(1, 2), whole[:3000])
    await other.put_partial(seg(1, 2), whole[5000:], start=5000)  # a hole inside segment 2
    await other.put_segment(seg(1, 3), content(7))
    with pytest.raises(WalGap, match="hole"):
        await other.fetch(tmp_path, start_lsn=SEG)
    await other.put_partial(seg(1, 2), whole[3000:5000], start=3000)  # the hole filled
    fetched = await other.fetch(tmp_path, start_lsn=SEG)
    assert fetched.end == 4 * SEG and (tmp_path / seg(1, 2)).read_bytes() == whole


async def test_retention_removes_what_ends_before_a_point(store):
    for n in (1, 2, 3):
        await store.put_segment(seg(1, n), content(n))
    await store.put_partial(seg(1, 4), b"\x01" * 100)
    await store.put_partial(seg(1, 4), b"\x01" * 200)
    assert await store.remove_before(3 * SEG) == 3  # segments 1 and 2, the shorter partial
    listing = await store.listing()
    assert set(listing.segments) == {(1, 3)} and [end for _, end, _ in listing.partials[1, 4]] == [200]
    assert listing.newest() == (1, 4 * SEG + 200)


def test_an_empty_listing():
    assert StoredWal(SEG).newest() is None


async def test_each_base_version_has_its_own_wal(backend):  # noqa: F811
    """WAL written after one stored version never shows under another (an upload, an upgrade
    or a roll-back starts from its own version; template copies share a system identifier)."""
    first = WalStore(backend, "db1", segment_size=SEG, base="20261203T120000.000Z-aaaaaa")
    other = WalStore(backend, "db1", segment_size=SEG, base="20261203T130000.000Z-bbbbbb")
    key = await first.put_segment(seg(1, 1), content(1))
    assert key.startswith("dbs/db1/wal/20261203T120000.000Z-aaaaaa/")
    assert await first.newest() == (1, 2 * SEG) and await other.newest() is None
    await other.put_segment(seg(1, 1), content(2))  # the same name under another base: no conflict
    with pytest.raises(Exception, match="not a version"):
        WalStore(backend, "db1", base="../x")


async def test_retention_keeps_the_pieces_of_the_segment_it_cuts_into(store):
    """A kept base may start inside the segment being written: its pieces all stay, so a
    restore from that base still joins them from the segment's start."""
    whole = content(7)
    await store.put_segment(seg(1, 1), content(8))
    await store.put_partial(seg(1, 2), whole[:100])
    await store.put_partial(seg(1, 2), whole[100:200], start=100)
    await store.remove_before(2 * SEG + 150)
    listing = await store.listing()
    assert (1, 1) not in listing.segments  # wholly before: gone
    assert listing.newest() == (1, 2 * SEG + 200) and listing.cover(1, 2)[0] == 200


async def test_newest_skips_pieces_that_do_not_reach_their_segments_start(store):
    await store.put_segment(seg(1, 1), content(9))
    await store.put_partial(seg(1, 2), b"\x01" * 100, start=100)  # its start is missing
    assert await store.newest() == (1, 2 * SEG)
