"""When an online base backup is due (gateway/compute/basebackup.py `due`), and what is read from
the files pg_basebackup writes (backup_label, backup_manifest). End to end:
tests/e2e/test_base_backups.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gateway.compute import basebackup, pgcontrol
from gateway.compute.lifecycle import base_retry_seconds
from gateway.config import Settings

SEG = 16 << 20
LABEL = """START WAL LOCATION: 0/5000028 (file 000000020000000000000005)
CHECKPOINT LOCATION: 0/5000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-12-03 16:24:40 UTC
LABEL: pgsni base backup
START TIMELINE: 2
"""


def _inst(stored: int | None, base: int | None, base_at: float = 1000.0, hole=None):
    shipper = SimpleNamespace(store=SimpleNamespace(segment_size=SEG), stored_lsn=stored, hole=hole)
    return SimpleNamespace(shipper=shipper, base_lsn=base, base_at=base_at)


def test_due_by_wal_size():
    settings = Settings(base_backup_wal_mb=64, base_backup_hours=0)
    assert basebackup.due(_inst(SEG + (63 << 20), SEG), settings, now=2000.0) is None
    assert "64 MB of WAL" in basebackup.due(_inst(SEG + (64 << 20), SEG), settings, now=2000.0)
    assert basebackup.due(_inst(None, SEG), settings) is None  # nothing stored yet
    off = Settings(base_backup_wal_mb=0, base_backup_hours=0)
    assert basebackup.due(_inst(100 * SEG, SEG), off, now=1e9) is None


def test_due_by_age_once_a_segment_was_written():
    settings = Settings(base_backup_wal_mb=0, base_backup_hours=24)
    day = 24 * 3600
    assert basebackup.due(_inst(SEG + SEG - 1, SEG), settings, now=1000.0 + day) is None  # too little
    assert basebackup.due(_inst(2 * SEG, SEG), settings, now=1000.0 + day - 1) is None  # too young
    assert "24.0 hours old" in basebackup.due(_inst(2 * SEG, SEG), settings, now=1000.0 + day)


def test_due_at_once_after_wal_was_lost_to_shipping():
    """No stored version restores past a hole in the WAL, whatever the size and age settings."""
    off = Settings(base_backup_wal_mb=0, base_backup_hours=0)
    assert basebackup.due(_inst(2 * SEG, SEG), off) is None
    assert "lost to shipping" in basebackup.due(_inst(2 * SEG, SEG, hole=(1, 2 * SEG)), off)


def test_a_failed_base_backup_is_retried_sooner_after_wal_was_lost():
    assert [base_retry_seconds(n, urgent=True) for n in (1, 2, 3, 5, 6, 40)] == [10, 20, 40, 160, 300, 300]
    assert base_retry_seconds(1, urgent=False) == base_retry_seconds(9, urgent=False) == 300


def test_the_first_look_sets_the_base_where_storage_is():
    inst = _inst(7 * SEG, None)
    assert basebackup.due(inst, Settings(base_backup_wal_mb=16)) is None
    assert inst.base_lsn == 7 * SEG


def test_what_a_base_backup_says_about_its_wal(tmp_path):
    assert pgcontrol.parse_backup_label(LABEL) == pgcontrol.BackupLabel(0x5000028, 2, 0x5000060)
    with pytest.raises(pgcontrol.ControlError):
        pgcontrol.parse_backup_label("LABEL: no positions\n")
    (tmp_path / "backup_label").write_text(LABEL)
    manifest = {"WAL-Ranges": [{"Timeline": 2, "Start-LSN": "0/5000028", "End-LSN": "0/5000138"}]}
    (tmp_path / "backup_manifest").write_text(json.dumps(manifest))
    taken = basebackup._read(tmp_path, SEG)
    assert (taken.timeline, taken.start_lsn, taken.end_lsn, taken.checkpoint_lsn) == (2, 0x5000028, 0x5000138, 0x5000060)
    assert not (tmp_path / "backup_manifest").exists()  # no part of a data directory
    assert taken.describe("V") == {"wal": "V", "timeline": 2, "start_lsn": "0/5000028", "end_lsn": "0/5000138",
                                   "checkpoint_lsn": "0/5000060", "segment_size": SEG}
    (tmp_path / "backup_manifest").write_text(json.dumps({"WAL-Ranges": [{**manifest["WAL-Ranges"][0], "Timeline": 1}]}))
    with pytest.raises(basebackup.BaseBackupError, match="no matching backup_label"):
        basebackup._read(tmp_path, SEG)
