"""The receiver's spool after a process died (gateway/compute/walreceiver.py close_leftovers):
a `.part` file is kept (fsynced, closed) when the machine has not restarted since it was
written, deleted when it has (its unsynced tail may be zeros)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.compute import walreceiver
from gateway.compute.walreceiver import BOOT_MARK, close_leftovers

SEGMENT = "000000010000000000000003"


@pytest.fixture
def spool(tmp_path, monkeypatch) -> Path:
    boot = tmp_path / "boot_id"
    boot.write_text("this-boot\n")
    monkeypatch.setattr(walreceiver, "BOOT_ID", boot)
    path = tmp_path / "spool"
    path.mkdir()
    (path / f"{SEGMENT}.00001000.part").write_bytes(b"wal" * 100)
    (path / f"{SEGMENT}.00000000.done").write_bytes(b"closed")
    return path


def names(spool: Path) -> set[str]:
    return {p.name for p in spool.iterdir() if p.name != BOOT_MARK}


def test_same_boot_the_part_file_is_closed_with_its_bytes(spool):
    (spool / BOOT_MARK).write_text("this-boot\n")
    close_leftovers(spool)
    assert names(spool) == {f"{SEGMENT}.00001000.done", f"{SEGMENT}.00000000.done"}
    assert (spool / f"{SEGMENT}.00001000.done").read_bytes() == b"wal" * 100


def test_after_a_restart_the_part_file_is_deleted_and_closed_files_stay(spool, caplog):
    (spool / BOOT_MARK).write_text("an-earlier-boot\n")
    close_leftovers(spool)
    assert names(spool) == {f"{SEGMENT}.00000000.done"}  # fsynced when it was closed
    assert "restarted" in caplog.text
    assert (spool / BOOT_MARK).read_text().strip() == "this-boot"  # new files are this boot's


def test_a_spool_without_a_mark_gets_one_and_keeps_its_files(spool):
    close_leftovers(spool)
    assert names(spool) == {f"{SEGMENT}.00001000.done", f"{SEGMENT}.00000000.done"}
    assert (spool / BOOT_MARK).read_text().strip() == "this-boot"
    assert (spool / BOOT_MARK).stat().st_mode & 0o077 == 0  # private, as every spool file
