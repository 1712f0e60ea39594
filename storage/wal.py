"""WAL of a running database in storage, written by the gateway's WAL shipper and read back to
replay a restore up to a point. Storage knows WAL file names and LSNs, never Postgres itself.

Layout, under the database's prefix (every object is immutable, created only if absent):

    dbs/<id>/wal/<TTTTTTTTXXXXXXXXYYYYYYYY>.zst           a completed segment, zstd
    dbs/<id>/wal/<TTTTTTTTXXXXXXXXYYYYYYYY>.<OOOOOOOO>.partial.zst
                                                          the first 0xOOOOOOOO bytes of a
                                                          segment still being written, zstd
    dbs/<id>/wal/<TTTTTTTTXXXXXXXXYYYYYYYY>.<SSSSSSSS>-<EEEEEEEE>.partial.zst
                                                          bytes 0xSSSSSSSS up to 0xEEEEEEEE
                                                          of a segment being written, zstd
    dbs/<id>/wal/<TTTTTTTT>.history                       a timeline's history, as Postgres
                                                          writes it (plain text)

A segment name is Postgres' own: timeline, then the segment number split in two (the log and
the segment within it, for the database's segment size, 16 MiB unless initdb said otherwise).
A partial object (a piece) holds exactly the bytes of its range: its name says which, so a
later upload (more bytes) has another name. The shipper stores a segment being written as
pieces that follow one another (each what arrived since the last), now and then one piece
from the segment's start that replaces them (fewer objects for a restore to read), and the
whole segment once it is complete. A restore takes the pieces that reach furthest from the
segment's start without a hole and pads the rest with zeros (which is what the unwritten rest
of a segment holds). A piece inside another, and every piece of a segment stored complete, is
garbage: the shipper deletes what it replaced, `remove_superseded` what crashed runs left.

Immutability: each object is written with If-None-Match (`put(if_none_match=True)`). If the
name exists, the stored content is compared: the same bytes are a retry or a restarted
shipper and count as success; other bytes mean that two writers produced different WAL under
one name (two gateways running one database, or a copy restored elsewhere that kept going on
the same timeline), and WalConflict is raised: nothing stored is ever replaced.

A restore (`fetch`) follows the timeline history of the newest (or a given) timeline, as
Postgres' recovery will, from the base's start LSN onward, and refuses a hole: if a segment
the replay needs is missing while later WAL exists, WalGap is raised instead of replaying
less than storage holds. Retention (`remove_before`) deletes segments that end before a point
(the oldest base that is kept); history files are tiny and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from .backend import Backend
from .errors import PreconditionFailed, StorageError
from .ids import valid_version

DEFAULT_SEGMENT_SIZE = 16 << 20
MAX_SEGMENT_SIZE = 64 << 20  # a segment is compressed and uploaded from memory
LEVEL = 1  # WAL is shipped while commits wait for it: speed over ratio
INLINE = 256 << 10  # compressed in the event loop up to this size (well under a millisecond)

_SEGMENT = re.compile(r"[0-9A-F]{24}")
_HISTORY = re.compile(r"([0-9A-F]{8})\.history")
_OBJECT = re.compile(r"(?P<seg>[0-9A-F]{24})(?:\.(?:(?P<start>[0-9A-F]{8})-)?(?P<off>[0-9A-F]{8})\.partial)?\.zst")


class WalConflict(PreconditionFailed):
    """Storage already holds other bytes under this WAL file's name: another writer's history."""


class WalGap(StorageError):
    """The WAL a restore needs is not all in storage (a segment or a history is missing)."""


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per_log = 0x1_0000_0000 // segment_size
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def parse_segment_name(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[int, int] | None:
    """(timeline, segment number) of a WAL segment file name, or None for anything else."""
    if not _SEGMENT.fullmatch(name):
        return None
    per_log = 0x1_0000_0000 // segment_size
    return int(name[:8], 16), int(name[8:16], 16) * per_log + int(name[16:], 16)


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def parse_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file's entries: (ancestor timeline, LSN where it was left)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        entries.append((int(fields[0]), parse_lsn(fields[1])))
    return entries


@dataclass
class StoredWal:
    """What storage holds of one database's WAL (`WalStore.listing`)."""
    segment_size: int
    segments: dict[tuple[int, int], str] = field(default_factory=dict)  # (tli, segno) -> key
    # (tli, segno) -> the pieces of a segment being written, [(start, end, key)] sorted
    partials: dict[tuple[int, int], list[tuple[int, int, str]]] = field(default_factory=dict)
    histories: dict[int, str] = field(default_factory=dict)

    def cover(self, timeline: int, segno: int) -> tuple[int, list[tuple[int, int, str]]]:
        """How far (an offset in the segment) its pieces reach from its start without a hole,
        and the fewest pieces that do (each starting at or before where the last ended)."""
        end, used = 0, []
        pieces = sorted(self.partials.get((timeline, segno), ()), key=lambda p: (p[0], -p[1]))
        while True:
            best = max((p for p in pieces if p[0] <= end and p[1] > end), key=lambda p: p[1], default=None)
            if best is None:
                return end, used
            used.append(best)
            end = best[1]

    def end(self, timeline: int, segno: int) -> int | None:
        """Where the stored WAL of one segment ends (an LSN), or None if none is stored."""
        if (timeline, segno) in self.segments:
            return (segno + 1) * self.segment_size
        if (timeline, segno) in self.partials:
            reach = self.cover(timeline, segno)[0]
            return segno * self.segment_size + reach if reach else None
        return None

    def newest(self) -> tuple[int, int] | None:
        """(timeline, LSN) of the newest stored WAL: the highest timeline, then the end of its
        highest segment."""
        for tli, segno in sorted(set(self.segments) | set(self.partials), reverse=True):
            end = self.end(tli, segno)
            if end is not None:  # pieces that do not reach back to its start: an earlier one
                return tli, end
        return None

    def superseded(self) -> list[str]:
        """Pieces inside the ones a restore takes, and all pieces of a complete segment."""
        keys = []
        for seg, found in self.partials.items():
            if seg in self.segments:
                keys += [key for _, _, key in found]
                continue
            reach, used = self.cover(*seg)
            keys += [key for start, end, key in found if (start, end, key) not in used and end <= reach]
        return keys


@dataclass(frozen=True)
class Fetched:
    """What `fetch` wrote: WAL from `start` to `end` (LSNs) along `timeline`'s history."""
    timeline: int
    start: int
    end: int
    files: list[str]


class WalStore:
    def __init__(self, backend: Backend, db_id: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE,
                 level: int = LEVEL, base: str | None = None) -> None:
        """`base`: the stored version the WAL continues (the version the running copy descends
        from). WAL written after one version never applies to another (an upload, an upgrade
        or a roll-back starts from a version of its own; copies of one template even share
        their system identifier), so each version's WAL has its own prefix."""
        if segment_size > MAX_SEGMENT_SIZE or segment_size & (segment_size - 1):
            raise StorageError(f"unsupported WAL segment size {segment_size}")
        if base is not None and not valid_version(base):
            raise StorageError(f"not a version: {base!r}")
        self.backend, self.db_id, self.segment_size, self.level = backend, db_id, segment_size, level
        self.prefix = f"dbs/{db_id}/wal/" + (f"{base}/" if base else "")

    def segment_key(self, name: str) -> str:
        return f"{self.prefix}{name}.zst"

    def partial_key(self, name: str, end: int, start: int = 0) -> str:
        span = f"{start:08X}-{end:08X}" if start else f"{end:08X}"
        return f"{self.prefix}{name}.{span}.partial.zst"

    # --- writes --------------------------------------------------------------------------------
    async def put_segment(self, name: str, data: bytes) -> str:
        """Store a completed segment (its whole content). Returns its key."""
        self._check_segment(name)
        if len(data) != self.segment_size:
            raise StorageError(f"WAL segment {name} has {len(data)} bytes, not {self.segment_size}")
        key = self.segment_key(name)
        await self._put_once(key, data, compress=True)
        return key

    async def put_partial(self, name: str, data: bytes, start: int = 0) -> str:
        """Store bytes `start` up to `start + len(data)` of a segment still being written (a
        piece). Returns its key."""
        self._check_segment(name)
        if not (data and 0 <= start and start + len(data) <= self.segment_size):
            raise StorageError(f"a piece of WAL segment {name} of {len(data)} bytes from {start}")
        key = self.partial_key(name, start + len(data), start)
        await self._put_once(key, data, compress=True)
        return key

    async def put_history(self, name: str, data: bytes) -> str:
        if not _HISTORY.fullmatch(name):
            raise StorageError(f"not a timeline history file name: {name!r}")
        key = self.prefix + name
        await self._put_once(key, data, compress=False)
        return key

    def _check_segment(self, name: str) -> None:
        if parse_segment_name(name, self.segment_size) is None:
            raise StorageError(f"not a WAL segment name: {name!r}")

    async def _put_once(self, key: str, raw: bytes, *, compress: bool) -> None:
        """Create `key` (immutable). An existing object with the same content is success."""
        if not compress:
            blob = raw
        elif len(raw) <= INLINE:  # a piece of a commit or a few: faster than a thread hop
            blob = self._compress(raw)
        else:
            blob = await asyncio.to_thread(self._compress, raw)
        try:
            await self.backend.put(key, blob, if_none_match=True)
        except PreconditionFailed:
            if await self.read(key) != raw:
                raise WalConflict(f"{key} already holds other WAL in {self.backend.describe()}: "
                                  f"another writer went on with this database's history") from None

    def _compress(self, raw: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level, write_checksum=True).compress(raw)

    async def read(self, key: str) -> bytes:
        """The content of one stored WAL object (a segment's bytes, uncompressed). An object
        larger than any this gateway writes is refused before it is all read (a tampered store
        must not make the gateway hold gigabytes): a history file is a small object (the
        backend's `get` bounds those), a segment at most its size with zstd's worst-case
        overhead."""
        if not key.endswith(".zst"):
            return (await self.backend.get(key))[0]
        limit = self.segment_size + (self.segment_size >> 6) + (1 << 16)
        chunks, size = [], 0
        async with contextlib.aclosing(self.backend.download(key)) as download:
            async for chunk in download:
                size += len(chunk)
                if size > limit:
                    raise StorageError(f"WAL object {key} is larger than any WAL object (over "
                                       f"{limit} bytes): not read")
                chunks.append(chunk)
        return await asyncio.to_thread(self._decompress, key, b"".join(chunks))

    def _decompress(self, key: str, blob: bytes) -> bytes:
        try:
            return zstandard.ZstdDecompressor().decompress(blob, max_output_size=self.segment_size)
        except zstandard.ZstdError as e:
            raise StorageError(f"WAL object {key} is damaged: {e}") from e

    # --- reads ---------------------------------------------------------------------------------
    async def listing(self) -> StoredWal:
        stored = StoredWal(self.segment_size)
        for info in await self.backend.list(self.prefix):
            name = info.key[len(self.prefix):]
            if m := _HISTORY.fullmatch(name):
                stored.histories[int(m.group(1), 16)] = info.key
            elif m := _OBJECT.fullmatch(name):
                seg = parse_segment_name(m.group("seg"), self.segment_size)
                if m.group("off") is None:
                    stored.segments[seg] = info.key
                else:
                    start = int(m.group("start") or "0", 16)
                    stored.partials.setdefault(seg, []).append((start, int(m.group("off"), 16), info.key))
        for found in stored.partials.values():
            found.sort()
        return stored

    async def newest(self) -> tuple[int, int] | None:
        """(timeline, LSN) up to which WAL is stored, or None if there is none."""
        return (await self.listing()).newest()

    async def history(self, timeline: int, stored: StoredWal | None = None) -> list[tuple[int, int]]:
        """The ancestors of `timeline` with their switch points (empty for timeline 1)."""
        if timeline == 1:
            return []
        stored = stored or await self.listing()
        if timeline not in stored.histories:
            raise WalGap(f"the history of WAL timeline {timeline} is not in storage")
        return parse_history((await self.read(stored.histories[timeline])).decode())

    async def fetch(self, dest: Path, *, start_lsn: int, timeline: int | None = None,
                    until_lsn: int | None = None, base_timeline: int | None = None) -> Fetched:
        """Write the stored WAL a replay from `start_lsn` needs into directory `dest`: every
        history file, and the segments along `timeline`'s history (default: the newest) from
        the one holding `start_lsn` up to the one holding `until_lsn` (default: all there
        is), partial ones padded with zeros. WalGap if one is missing before later WAL or
        before `until_lsn`, or if the base (on `base_timeline` at `start_lsn`) is not on that
        history."""
        stored = await self.listing()
        newest = stored.newest()
        if timeline is None:
            timeline = max([newest[0] if newest else 1, *stored.histories])
        path = self._timeline_path(timeline, await self.history(timeline, stored))
        if base_timeline is not None:
            self._check_on_path(path, base_timeline, start_lsn)
        files = [await self._write(dest, name, key, pad=False)
                 for name, key in ((history_name(t), k) for t, k in sorted(stored.histories.items()))]
        segno, end = start_lsn // self.segment_size, start_lsn
        last = None if until_lsn is None else until_lsn // self.segment_size
        while last is None or segno <= last:
            tli = next(t for t, begin in reversed(path) if begin // self.segment_size <= segno)
            seg_end = stored.end(tli, segno)
            if seg_end is None:
                self._check_no_later(stored, path, tli, segno, segno * self.segment_size, until_lsn)
                break
            complete = seg_end == (segno + 1) * self.segment_size  # whole, or in pieces that reach its end
            name = segment_name(tli, segno, self.segment_size)
            if (tli, segno) in stored.segments:
                files.append(await self._write(dest, name, stored.segments[tli, segno], pad=False))
            else:
                files.append(await self._write_pieces(dest, name, stored.cover(tli, segno)[1]))
            end = seg_end
            if not complete:
                self._check_no_later(stored, path, tli, segno + 1, seg_end, until_lsn)
                break
            segno += 1
        if until_lsn is not None and end < until_lsn:
            raise WalGap(f"the stored WAL ends at {format_lsn(end)}, before {format_lsn(until_lsn)}")
        return Fetched(timeline, start_lsn, end, files)

    def _timeline_path(self, timeline: int, ancestors: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """[(timeline, LSN where it begins)], oldest first, ending with `timeline`."""
        path, begin = [], 0
        for tli, switch in ancestors:
            path.append((tli, begin))
            begin = switch
        return path + [(timeline, begin)]

    def _check_on_path(self, path: list[tuple[int, int]], base_timeline: int, start_lsn: int) -> None:
        ends = {tli: end for (tli, _), (_, end) in zip(path, path[1:])}
        if base_timeline not in {tli for tli, _ in path} or ends.get(base_timeline, start_lsn) < start_lsn:
            raise WalGap(f"the base (timeline {base_timeline} at {format_lsn(start_lsn)}) is not on "
                         f"the history of timeline {path[-1][0]}")

    def _check_no_later(self, stored: StoredWal, path: list[tuple[int, int]], tli: int, segno: int,
                        end: int, until_lsn: int | None) -> None:
        """Refuse a replay that stops at `end` (segment `segno` of `tli` is not stored whole
        from there): if the restore needs WAL up to `until_lsn` past it, or if storage holds
        WAL along `path` past it (a hole)."""
        name = segment_name(tli, end // self.segment_size, self.segment_size)
        missing = f"the WAL from {format_lsn(end)} (in segment {name}) is not in storage"
        if until_lsn is not None and segno * self.segment_size <= until_lsn:
            raise WalGap(f"{missing}, and the restore needs WAL up to {format_lsn(until_lsn)}")
        if self._stored_past(stored, path, end // self.segment_size):
            raise WalGap(f"{missing}, but later WAL is: a hole in the stored WAL")

    def _stored_past(self, stored: StoredWal, path: list[tuple[int, int]], segno: int) -> bool:
        """Whether storage holds WAL in a segment after `segno` that the replay along `path`
        would read: on any timeline of the path (a later one too, not only the one the hole
        is on), in the segments that timeline has on the path (an old timeline's WAL written
        on after the fork is not). A piece of segment `segno` itself past a hole in it is not
        counted (WAL past a loss the shipper logged, never acknowledged in durability=sync)."""
        size = self.segment_size
        spans = {tli: (begin // size, None if end is None else end // size)
                 for (tli, begin), (_, end) in zip(path, [*path[1:], (0, None)])}
        for tli, n in (*stored.segments, *stored.partials):
            if tli in spans and n > segno and n >= spans[tli][0] and (spans[tli][1] is None or n <= spans[tli][1]):
                return True
        return False

    async def _write(self, dest: Path, name: str, key: str, *, pad: bool) -> str:
        data = await self.read(key)
        if key.endswith(".zst") and not pad and len(data) != self.segment_size:
            raise StorageError(f"WAL object {key} holds {len(data)} bytes, not a whole segment")
        await asyncio.to_thread(self._write_file, dest, name, [(0, data)])
        return name

    async def _write_pieces(self, dest: Path, name: str, pieces: list[tuple[int, int, str]]) -> str:
        """A segment being written, from its pieces (`StoredWal.cover`), padded with zeros."""
        parts = []
        for start, end, key in pieces:
            data = await self.read(key)
            if len(data) != end - start:
                raise StorageError(f"WAL object {key} holds {len(data)} bytes, not {end - start}")
            parts.append((start, data))
        await asyncio.to_thread(self._write_file, dest, name, parts)
        return name

    def _write_file(self, dest: Path, name: str, parts: list[tuple[int, bytes]]) -> None:
        tmp = dest / f".{name}.tmp"
        with open(tmp, "wb") as f:
            for start, data in parts:
                f.seek(start)
                f.write(data)
            if _SEGMENT.fullmatch(name):
                f.truncate(self.segment_size)  # the unwritten rest of a segment is zeros
        os.replace(tmp, dest / name)

    # --- removal -------------------------------------------------------------------------------
    async def remove_superseded(self) -> int:
        """Delete partials replaced by longer ones or by their complete segment."""
        keys = (await self.listing()).superseded()
        await self.backend.delete(keys)
        return len(keys)

    async def remove_before(self, lsn: int) -> int:
        """Delete the WAL that ends at or before `lsn` on every timeline (retention: `lsn` is
        where the replay from the oldest kept base starts). Returns how many objects went."""
        stored = await self.listing()
        keys = [key for (_, segno), key in stored.segments.items()
                if (segno + 1) * self.segment_size <= lsn]
        for (_, segno), found in stored.partials.items():  # only segments wholly before `lsn`:
            # the pieces of the one holding it all reach back to its start
            keys += [key for _, _, key in found if (segno + 1) * self.segment_size <= lsn]
        keys = sorted(set(keys) | set(stored.superseded()))
        await self.backend.delete(keys)
        return len(keys)

