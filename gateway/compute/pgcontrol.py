"""What a stopped data directory's control file says (pg_controldata), and whether anything was
written to it between two clean stops.

A clean stop always ends with a shutdown checkpoint record. If nothing was written since the
previous clean stop, that record follows the previous checkpoint directly (or after a
parameter-change record that start-up writes when wal-related settings changed). Any commit,
however late before the stop, puts other records in between. This is read after the
postmaster exited, so no write can slip past it."""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from storage.osuser import RunAs, clean_env
from storage.wal import parse_lsn

_FIELDS = {
    "state": r"Database cluster state:\s*(.+)",
    "location": r"Latest checkpoint location:\s*([0-9A-F]+/[0-9A-F]+)",
    "timeline": r"Latest checkpoint's TimeLineID:\s*(\d+)",
    "segment_size": r"Bytes per WAL segment:\s*(\d+)",
    "checksums": r"Data page checksum version:\s*(\d+)",
}
# XLogRecord's head: xl_tot_len, xl_xid, xl_prev, xl_info, xl_rmid (host byte order)
_RECORD_HEAD = struct.Struct("=IIQBB")
_PAGE = 8192  # XLOG_BLCKSZ
_PARAMETER_CHANGE = (0, 0x60)  # RM_XLOG_ID, XLOG_PARAMETER_CHANGE


class ControlError(Exception):
    """The control file or the WAL could not be read as expected."""


@dataclass(frozen=True)
class Control:
    shut_down: bool  # the last stop was clean ("shut down")
    checkpoint: int  # location of the latest checkpoint record
    timeline: int
    segment_size: int
    checksums: bool

    def wal_file(self, pgdata: Path, lsn: int) -> tuple[Path, int]:
        """The WAL segment holding `lsn` on this timeline, and the offset in it."""
        per_id = 0x1_0000_0000 // self.segment_size
        segno = lsn // self.segment_size
        name = f"{self.timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"
        return pgdata / "pg_wal" / name, lsn % self.segment_size


def read(bindir: Path, pgdata: Path, run_as: RunAs | None = None) -> Control:
    """The control file of a data directory (read as `run_as`, its owner, where given)."""
    done = subprocess.run([str(bindir / "pg_controldata"), str(pgdata)], env=clean_env(LC_ALL="C"),
                          capture_output=True, text=True, timeout=60,
                          **(run_as.popen_kwargs() if run_as else {}))
    found = {k: re.search(rx, done.stdout) for k, rx in _FIELDS.items()}
    if done.returncode != 0 or not all(found.values()):
        raise ControlError(f"pg_controldata {pgdata} failed: {(done.stderr or done.stdout).strip()[:300]}")
    return Control(shut_down=found["state"].group(1).strip() == "shut down",
                   checkpoint=parse_lsn(found["location"].group(1)),
                   timeline=int(found["timeline"].group(1)),
                   segment_size=int(found["segment_size"].group(1)),
                   checksums=found["checksums"].group(1) != "0")


def written_between(pgdata: Path, before: Control, after: Control) -> bool:
    """Whether anything was written between two clean stops (`before` read when the instance
    started, `after` once it stopped). When unsure, yes."""
    if not (before.shut_down and after.shut_down) or after.timeline != before.timeline:
        return True
    if after.checkpoint == before.checkpoint:
        return False  # not even a shutdown checkpoint: the postmaster never got going
    path, offset = after.wal_file(pgdata, before.checkpoint)
    if after.wal_file(pgdata, after.checkpoint)[0] != path:
        return True  # a new segment: surely written
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            wal = f.read(after.checkpoint - before.checkpoint + _RECORD_HEAD.size)
    except OSError:
        return True
    return not _only_bookkeeping(wal, before.checkpoint, after.checkpoint)


def _only_bookkeeping(wal: bytes, start: int, end: int) -> bool:
    """Whether the records from the checkpoint at `start` up to the one at `end` are that
    checkpoint followed by nothing but XLOG_PARAMETER_CHANGE (written at start-up when settings
    such as max_connections differ from the last run's: no data). Records are walked within
    one WAL page only; anything else counts as a change."""
    pos, first = start, True
    while pos < end:
        at = pos - start
        if len(wal) < at + _RECORD_HEAD.size:
            return False
        length, _, _, info, rmgr = _RECORD_HEAD.unpack_from(wal, at)
        if not first and (rmgr, info & 0xF0) != _PARAMETER_CHANGE:
            return False
        following = (pos + length + 7) & ~7  # records start MAXALIGNed
        if length < _RECORD_HEAD.size or following // _PAGE != pos // _PAGE or following % _PAGE == 0:
            return False  # crosses into a page header: not followed here
        pos, first = following, False
    return pos == end


_SHORT_PAGE_HEADER, _LONG_PAGE_HEADER = 24, 40  # XLogPageHeaderData, XLogLongPageHeaderData (MAXALIGNed)


def checkpoint_end(pgdata: Path, control: Control) -> int | None:
    """Where the WAL of a cleanly stopped copy ends: just after its shutdown checkpoint record
    (the position the next record would take). None if the record cannot be read from the
    copy's own pg_wal."""
    path, offset = control.wal_file(pgdata, control.checkpoint)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            head = f.read(_RECORD_HEAD.size)
    except OSError:
        return None
    if len(head) < _RECORD_HEAD.size:
        return None
    length = _RECORD_HEAD.unpack_from(head)[0]
    if length < _RECORD_HEAD.size:
        return None
    pos, left = control.checkpoint, length
    while True:
        room = _PAGE - pos % _PAGE
        if left <= room:
            return (pos + left + 7) & ~7
        left -= room
        pos += room  # the next page, after its header (a long one where a segment begins)
        pos += _LONG_PAGE_HEADER if pos % control.segment_size == 0 else _SHORT_PAGE_HEADER


@dataclass(frozen=True)
class BackupLabel:
    """What a base backup's `backup_label` says: where its replay starts (the redo point of the
    backup's checkpoint), on which timeline, and that checkpoint's location."""
    start: int
    timeline: int
    checkpoint: int


_LABEL_FIELDS = {
    "start": r"START WAL LOCATION:\s*([0-9A-F]+/[0-9A-F]+)",
    "checkpoint": r"CHECKPOINT LOCATION:\s*([0-9A-F]+/[0-9A-F]+)",
    "timeline": r"START TIMELINE:\s*(\d+)",
}


def backup_label(pgdata: Path) -> BackupLabel | None:
    """The backup label of a data directory that is an online base backup not replayed yet
    (Postgres renames the file once its recovery has read it); None for any other."""
    try:
        text = (pgdata / "backup_label").read_text(errors="replace")
    except FileNotFoundError:
        return None
    return parse_backup_label(text)


def parse_backup_label(text: str) -> BackupLabel:
    found = {k: re.search(rx, text) for k, rx in _LABEL_FIELDS.items()}
    if not all(found.values()):
        raise ControlError(f"backup_label lacks {[k for k, v in found.items() if not v]}")
    return BackupLabel(start=parse_lsn(found["start"].group(1)), timeline=int(found["timeline"].group(1)),
                       checkpoint=parse_lsn(found["checkpoint"].group(1)))
