"""Online base backups of a running database (durability=async): `pg_basebackup` of the
database's own major copies the running instance's data directory into a directory of the
gateway's (plain format, `-X none`: its WAL is in storage already, shipped by walship.py), and
the lifecycle (`Database.base_backup` in gateway/compute/lifecycle.py) stores that as a version
which continues the running copy's WAL prefix (storage/snapshots.py `base_backup`). A restore
of it replays the stored WAL from the backup's start, past its end (Postgres refuses to stop
before), on to the newest (gateway/compute/durability.py, walrestore.py).

It connects as the WAL receiver does: the admin role by peer over the private socket, a
replication connection (pg_hba.conf's `local replication pgsni_admin peer`), an environment
built from nothing. It needs a free WAL sender (the receiver takes one of four).

Due (`due`) once the WAL stored since the running copy's newest base (its start, or its last
base backup) exceeds `base_backup_wal_mb`, or that base is older than `base_backup_hours` and
at least a WAL segment was written since."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings
from storage.errors import StorageError
from storage.osuser import clean_env
from storage.wal import format_lsn, parse_lsn

from . import pgcontrol
from .postgres import ChildProcess, _tail
from .running import Instance
from .walship import replication_conninfo

WAL_WAIT_SECONDS = 60.0  # the most a backup waits for the shipper to store the WAL up to its end
TIMEOUT_SECONDS = 6 * 3600.0  # the most pg_basebackup may take


class BaseBackupError(Exception):
    """pg_basebackup failed, or what it wrote is not a base backup this gateway can store."""


@dataclass(frozen=True)
class Taken:
    """A base backup on local disk: its data directory and where its WAL starts and ends."""
    pgdata: Path
    timeline: int
    start_lsn: int
    end_lsn: int
    checkpoint_lsn: int
    segment_size: int

    def describe(self, wal: str) -> dict:
        """The manifest's `base_backup` (storage/snapshots.py); `wal`: the prefix it continues."""
        return {"wal": wal, "timeline": self.timeline, "start_lsn": format_lsn(self.start_lsn),
                "end_lsn": format_lsn(self.end_lsn), "checkpoint_lsn": format_lsn(self.checkpoint_lsn),
                "segment_size": self.segment_size}


async def take(inst: Instance, target: Path, *, fast: bool, timeout: float = TIMEOUT_SECONDS) -> Taken:
    """Run pg_basebackup of the running instance into `target` (which must not exist; its
    parent is the gateway's), with a fast or a spread checkpoint. Its log is `target`.log."""
    if inst.shipper is None or inst.shipper.store is None:
        raise BaseBackupError(f"database {inst.db_id} ships no WAL: an online base backup needs "
                              f"durability=async")
    log_path = target.with_name(target.name + ".log")
    argv = [str(inst.process.bindir / "pg_basebackup"), "-D", str(target), "-F", "p", "-X", "none",
            "-c", "fast" if fast else "spread", "--no-sync", "--manifest-checksums=NONE",
            "--label", "pgsni base backup", "-d", replication_conninfo(inst.socket_dir), "--no-password"]
    with open(log_path, "wb") as logf:
        proc = ChildProcess(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT, env=clean_env(),
                                             start_new_session=True))
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except BaseException:  # timed out or cancelled: nothing of it keeps running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if code != 0:
        raise BaseBackupError(f"pg_basebackup of {inst.db_id} exited with {code}: {_tail(log_path, 3)}")
    return await asyncio.to_thread(_read, target, inst.shipper.store.segment_size)


def _read(pgdata: Path, segment_size: int) -> Taken:
    """Where the backup's WAL starts (backup_label) and ends (backup_manifest's WAL range);
    the manifest is removed: it is no part of a data directory."""
    label = pgcontrol.backup_label(pgdata)
    try:
        ranges = json.loads((pgdata / "backup_manifest").read_text())["WAL-Ranges"]
        end, timeline = parse_lsn(ranges[-1]["End-LSN"]), int(ranges[-1]["Timeline"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BaseBackupError(f"the base backup in {pgdata} has no readable backup_manifest: {e!r}") from None
    if label is None or timeline != label.timeline or end < label.start:
        raise BaseBackupError(f"the base backup in {pgdata} has no matching backup_label")
    (pgdata / "backup_manifest").unlink()
    return Taken(pgdata, timeline, label.start, end, label.checkpoint, segment_size)


async def wait_stored(inst: Instance, taken: Taken, timeout: float = WAL_WAIT_SECONDS) -> None:
    """Wait until storage holds the instance's WAL up to the backup's end: only then can the
    backup be restored. StorageError if it does not within `timeout` (storage down)."""
    deadline = time.monotonic() + timeout
    while True:
        shipper = inst.shipper
        if shipper is None or shipper.failed is not None:
            raise StorageError(f"the WAL shipping of {inst.db_id} stopped before its base backup's "
                               f"WAL was stored")
        if shipper.stored is not None and shipper.stored >= (taken.timeline, taken.end_lsn):
            return
        if time.monotonic() > deadline:
            raise StorageError(f"storage does not hold the WAL of {inst.db_id} up to its base "
                               f"backup's end ({format_lsn(taken.end_lsn)}) after {timeout:.0f} s"
                               + (f": {shipper.last_error}" if shipper.last_error else ""))
        await asyncio.sleep(0.05)


def newest_base(inst: Instance) -> int | None:
    """Where a replay from the stopped copy the instance starts on would begin: a base
    backup's start, else its last checkpoint (read before the start)."""
    label = pgcontrol.backup_label(inst.process.pgdata)
    if label is not None:
        return label.start
    return inst.control.checkpoint if inst.control is not None else None


def due(inst: Instance, settings: Settings, now: float | None = None) -> str | None:
    """Why a base backup of the running instance is due now (see the module doc), or None."""
    shipper = inst.shipper
    if shipper is None or shipper.store is None or shipper.stored_lsn is None:
        return None
    if shipper.hole is not None:
        return f"WAL up to {format_lsn(shipper.hole[1])} was lost to shipping: no stored version restores past it"
    if inst.base_lsn is None:
        inst.base_lsn = shipper.stored_lsn
    since = shipper.stored_lsn - inst.base_lsn
    if settings.base_backup_wal_mb > 0 and since >= settings.base_backup_wal_mb << 20:
        return f"{since >> 20} MB of WAL since its newest base"
    age = (now or time.time()) - inst.base_at
    if settings.base_backup_hours > 0 and age >= settings.base_backup_hours * 3600 \
            and since >= shipper.store.segment_size:
        return f"its newest base is {age / 3600:.1f} hours old"
    return None
