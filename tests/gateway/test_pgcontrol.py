"""The "was anything written between two clean stops" rule (gateway/compute/pgcontrol.py) on
hand-made WAL: a shutdown checkpoint, maybe a parameter change, the next shutdown checkpoint."""

from __future__ import annotations

import struct

from gateway.compute.pgcontrol import _RECORD_HEAD, Control, _only_bookkeeping, checkpoint_end

CHECKPOINT, PARAMETER_CHANGE, HEAP_INSERT = (0, 0x00, 114), (0, 0x60, 54), (10, 0x00, 59)


def wal(start: int, *records: tuple[int, int, int]) -> tuple[bytes, int]:
    """The bytes from `start` holding `records` (rmgr, info, length); the position after them."""
    out, pos, prev = bytearray(), start, 0
    for rmgr, info, length in records:
        body = _RECORD_HEAD.pack(length, 0, prev, info, rmgr).ljust(length, b"\0")
        out += body.ljust(((pos + length + 7) & ~7) - pos, b"\0")
        prev, pos = pos, (pos + length + 7) & ~7
    return bytes(out) + _RECORD_HEAD.pack(114, 0, prev, 0, 0), pos


def test_the_next_checkpoint_right_after_the_last_means_nothing_was_written():
    data, end = wal(0x14D1400, CHECKPOINT)
    assert _only_bookkeeping(data, 0x14D1400, end)


def test_a_parameter_change_at_start_up_is_no_change():
    data, end = wal(0x14D1400, CHECKPOINT, PARAMETER_CHANGE)
    assert _only_bookkeeping(data, 0x14D1400, end)


def test_any_other_record_is_a_change():
    data, end = wal(0x14D1400, CHECKPOINT, HEAP_INSERT)
    assert not _only_bookkeeping(data, 0x14D1400, end)
    data, end = wal(0x14D1400, CHECKPOINT, PARAMETER_CHANGE, HEAP_INSERT, PARAMETER_CHANGE)
    assert not _only_bookkeeping(data, 0x14D1400, end)


def test_records_across_a_page_boundary_count_as_a_change():
    start = 0x14D2000 - 120  # the checkpoint ends right at the page's end
    data, end = wal(start, CHECKPOINT, PARAMETER_CHANGE)
    assert not _only_bookkeeping(data, start, end)


def test_short_or_damaged_wal_counts_as_a_change():
    data, end = wal(0x14D1400, CHECKPOINT, PARAMETER_CHANGE)
    assert not _only_bookkeeping(data[:130], 0x14D1400, end)
    assert not _only_bookkeeping(struct.pack("=I", 0) + data[4:], 0x14D1400, end)


# --- checkpoint_end: where a clean copy's WAL ends (gateway/compute/pgcontrol.py) -------------
SEGMENT = 16 << 20


def _copy_with_checkpoint(tmp_path, at: int, length: int = 114):
    control = Control(True, at, 1, SEGMENT, False)
    path, offset = control.wal_file(tmp_path, at)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\0" * offset + _RECORD_HEAD.pack(length, 0, 0, 0, 0) + b"\0" * (length - _RECORD_HEAD.size))
    return control


def test_the_end_of_a_checkpoint_inside_a_page(tmp_path):
    control = _copy_with_checkpoint(tmp_path, 0x14D1400)
    assert checkpoint_end(tmp_path, control) == 0x14D1400 + 120  # 114, MAXALIGNed


def test_the_end_of_a_checkpoint_across_pages_skips_the_page_header(tmp_path):
    at = 0x14D2000 - 40  # 40 bytes on this page, 74 after the next page's short header
    assert checkpoint_end(tmp_path, _copy_with_checkpoint(tmp_path, at)) == 0x14D2000 + 24 + 80
    at = 2 * SEGMENT - 40  # the next page begins a segment: a long header
    assert checkpoint_end(tmp_path, _copy_with_checkpoint(tmp_path, at)) == 2 * SEGMENT + 40 + 80


def test_no_end_without_the_record(tmp_path):
    assert checkpoint_end(tmp_path, Control(True, 0x14D1400, 1, SEGMENT, False)) is None
