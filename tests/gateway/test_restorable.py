"""db info's `restorable` (gateway/ops/operations.py restorable_range): from the oldest kept
version to now minus the WAL lag while the database runs here, else to its current version."""

from __future__ import annotations

import datetime as dt

from gateway.ops.operations import restorable_range
from gateway.ops.results import Version
from storage.snapshots import version_time

OLD, NEW = "20261201T080000.000Z-aaaaaa", "20261203T093000.250Z-bbbbbb"


def test_version_names_carry_their_time():
    assert version_time(NEW) == dt.datetime(2026, 12, 3, 9, 30, 0, 250000, tzinfo=dt.timezone.utc)
    assert version_time("uploaded-by-hand") is None


def test_a_stopped_database_reaches_its_current_version():
    got = restorable_range([Version(OLD, 1, False), Version(NEW, 1, True)], NEW, None)
    assert got == {"from": version_time(OLD).isoformat(), "to": version_time(NEW).isoformat(),
                   "rpo_seconds": None}


def test_a_running_database_reaches_now_minus_its_lag():
    before = dt.datetime.now(dt.timezone.utc)
    got = restorable_range([Version(OLD, 1, True)], OLD, {"lag_seconds": 2.5})
    to = dt.datetime.fromisoformat(got["to"])
    assert before - dt.timedelta(seconds=2.6) <= to <= dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=2.4)
    assert got["rpo_seconds"] == 2.5 and got["from"] == version_time(OLD).isoformat()


def test_no_versions_no_range():
    assert restorable_range([], None, None) is None


def test_wal_lost_to_shipping_ends_the_range_until_a_base_backup_after_it():
    lost = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=60)
    got = restorable_range([Version(OLD, 1, True)], OLD, {"lag_seconds": 0.5, "lost_after": lost.isoformat()})
    assert got["to"] == lost.isoformat() and 59 < got["rpo_seconds"] < 62
