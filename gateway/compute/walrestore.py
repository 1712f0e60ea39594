"""Restore to a point: a stopped base copy of a database plus its WAL from storage, replayed by
Postgres up to a time, an LSN or the end of what is stored, then promoted to a new timeline.

`prepare` fetches the WAL the replay needs (storage/wal.py) into a local directory the gateway
fills and the instance's OS user may read, and sets the copy up for archive recovery:
`recovery.signal`, and settings for that one start (`Recovery.options`, given on the command
line, where they win over SAFE_SETTINGS' empty restore_command) whose restore_command only
copies from that directory: no network, no credentials in the instance. `replay` runs that
start: Postgres replays, promotes (recovery_target_action=promote), and is stopped cleanly,
leaving a copy that starts like any other; the lifecycle then saves it as a new base.

A target is exclusive: `target_time` T gives the transactions committed before T,
`target_lsn` L the records that begin before L. Without a target, everything stored is
replayed. A target past the stored WAL is refused before anything starts (WalGap), and one
Postgres does not reach fails the replay. The new timeline (one above the newest history in
storage) is what fences the old history: WAL a former holder adds later on the old timeline is
never on the new one's path.
"""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from storage.errors import StorageError
from storage.osuser import RunAs
from storage.wal import Fetched, WalGap, WalStore, format_lsn

from . import pgcontrol
from .postgres import PostgresProcess, _tail
from .walship import forget_slot


@dataclass(frozen=True)
class Recovery:
    options: dict[str, str]  # settings for the start that replays
    fetched: Fetched
    wal_dir: Path


def restore_command(wal_dir: Path) -> str:
    """Copy one file from `wal_dir` (a missing one fails: the end of the archive)."""
    where = shlex.quote(str(wal_dir).replace("%", "%%"))
    return f"cp {where}/%f %p"


async def prepare(pgdata: Path, store: WalStore, wal_dir: Path, bindir: Path, run_as: RunAs, *,
                  target_time: dt.datetime | None = None, target_lsn: int | None = None,
                  timeline: int | None = None) -> Recovery:
    """Set up the stopped copy `pgdata` to replay the stored WAL (see the module doc).
    `wal_dir` must not be inside `pgdata`; it is made (or emptied) here."""
    if target_time is not None and target_lsn is not None:
        raise ValueError("a restore has one target: a time or an LSN")
    if target_time is not None and target_time.tzinfo is None:
        raise ValueError("target_time needs a time zone")
    control = pgcontrol.read(bindir, pgdata, run_as)
    if not control.shut_down:
        raise StorageError(f"the base copy {pgdata} was not shut down cleanly; a replay needs "
                           f"the stopped copy a snapshot holds")
    if control.segment_size != store.segment_size:
        raise StorageError(f"the base's WAL segments are {control.segment_size} bytes, the "
                           f"store's {store.segment_size}")
    shutil.rmtree(wal_dir, ignore_errors=True)
    run_as.make_dir(wal_dir)
    fetched = await store.fetch(wal_dir, start_lsn=control.checkpoint, timeline=timeline,
                                until_lsn=target_lsn, base_timeline=control.timeline)
    run_as.chown_tree(wal_dir)
    (pgdata / "standby.signal").unlink(missing_ok=True)
    run_as.write_file(pgdata / "recovery.signal", "")
    forget_slot(pgdata)
    options = {"restore_command": restore_command(wal_dir),
               "recovery_target_timeline": str(fetched.timeline),
               "recovery_target_action": "promote",
               # no connections before the promotion: then the postmaster is "ready" only
               # once the replay is over, and nobody reads a half-restored database
               "hot_standby": "off"}
    if target_time is not None:
        options.update(recovery_target_time=target_time.isoformat(), recovery_target_inclusive="off")
    elif target_lsn is not None:
        options.update(recovery_target_lsn=format_lsn(target_lsn), recovery_target_inclusive="off")
    return Recovery(options, fetched, wal_dir)


async def replay(recovery: Recovery, bindir: Path, pgdata: Path, socket_dir: Path, log_path: Path,
                 run_as: RunAs, options: dict[str, str], *, timeout: float = 600.0) -> pgcontrol.Control:
    """Start the prepared copy with `options` (the instance's usual ones) plus the recovery
    settings, wait until it has replayed and promoted, stop it cleanly and remove the fetched
    WAL. Returns the copy's control data (its new timeline). PostgresError if the replay
    fails (the log's last lines say why: a target not reached, a damaged segment)."""
    process = PostgresProcess(bindir, pgdata, socket_dir, log_path, run_as,
                              {**options, **recovery.options})
    try:
        await process.start(timeout)  # "ready" once promoted (hot_standby is off)
    finally:
        await process.stop(60.0)
    shutil.rmtree(recovery.wal_dir, ignore_errors=True)
    control = pgcontrol.read(bindir, pgdata, run_as)
    if not control.shut_down or control.timeline <= recovery.fetched.timeline:
        raise StorageError(f"the replay of {pgdata} did not end in a promoted, cleanly stopped "
                           f"copy ({control}): {_tail(log_path)}")
    return control


__all__ = ["Recovery", "WalGap", "prepare", "replay", "restore_command"]
