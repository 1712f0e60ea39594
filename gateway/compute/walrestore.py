"""Restore to a point: a stopped base copy of a database plus its WAL from storage, replayed by
Postgres up to a time, an LSN or the end of what is stored, then promoted to a new timeline.

`prepare` fetches the WAL the replay needs (storage/wal.py) into a local directory the gateway
fills and the instance's OS user may read, and sets the copy up for archive recovery:
`recovery.signal`, and settings for that one start (`Recovery.options`, given on the command
line, where they win over SAFE_SETTINGS' empty restore_command) whose restore_command only
copies from that directory: no network, no credentials in the instance. `replay` runs that
start: Postgres replays, promotes (recovery_target_action=promote), and is stopped cleanly,
leaving a copy that starts like any other; the lifecycle then saves it as a new base.

A time target is exclusive: `target_time` T gives the transactions committed before T. An LSN
target `target_lsn` L gives the records that begin before L, and with `inclusive` (what
`db restore --lsn` asks) the record that begins at L (or the first after it) too;
`immediate` stops at the end of an online base backup (the first consistent point). Without a
target, everything stored is replayed.

The copy is a snapshot of a stopped data directory (the replay starts at its shutdown
checkpoint) or an online base backup (gateway/compute/basebackup.py: it has a `backup_label`,
and the replay starts at the label's start and must pass the backup's end, which Postgres
checks). A target past the stored WAL is refused before anything starts (WalGap; OutOfReach
for an inclusive LSN target, which is also refused before the base), and one Postgres does not
reach fails the replay (OutOfReach when the WAL ended first). The new timeline (one above the
newest history in storage) is what fences the old history: WAL a former holder adds later on
the old timeline is never on the new one's path.
"""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from storage.errors import NotFound, StorageError
from storage.osuser import RunAs
from storage.wal import Fetched, WalGap, WalStore, format_lsn

from . import pgcontrol
from .postgres import PostgresError, PostgresProcess, _tail
from .walship import forget_slot

FETCH_ATTEMPTS = 3  # a running shipper may replace a partial segment between a listing and its read


class OutOfReach(WalGap):
    """A restore target that the base and the WAL stored after it do not reach: before the base,
    or past the stored WAL (a commit after a time target not in storage yet, say)."""


class BeforeBase(OutOfReach):
    """An LSN target before the base's checkpoint: an older version's WAL may hold it."""


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
                  inclusive: bool = False, immediate: bool = False, timeline: int | None = None) -> Recovery:
    """Set up the stopped copy `pgdata` to replay the stored WAL (see the module doc).
    `wal_dir` must not be inside `pgdata`; it is made (or emptied) here."""
    if (target_time is not None) + (target_lsn is not None) + immediate > 1:
        raise ValueError("a restore has one target: a time, an LSN or the backup's end")
    if target_time is not None and target_time.tzinfo is None:
        raise ValueError("target_time needs a time zone")
    control = pgcontrol.read(bindir, pgdata, run_as)
    start, base_timeline = replay_start(pgdata, control)
    if control.segment_size != store.segment_size:
        raise StorageError(f"the base's WAL segments are {control.segment_size} bytes, the "
                           f"store's {store.segment_size}")
    if target_lsn is not None and inclusive:
        await check_reach(store, start, control.timeline, target_lsn)
    shutil.rmtree(wal_dir, ignore_errors=True)
    run_as.make_dir(wal_dir)
    for attempt in range(FETCH_ATTEMPTS):
        try:
            fetched = await store.fetch(wal_dir, start_lsn=start, timeline=timeline,
                                        until_lsn=target_lsn, base_timeline=base_timeline)
            break
        except NotFound:  # superseded by a longer partial since the listing: list again
            if attempt == FETCH_ATTEMPTS - 1:
                raise
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
        options.update(recovery_target_lsn=format_lsn(target_lsn),
                       recovery_target_inclusive="on" if inclusive else "off")
    elif immediate:
        options.update(recovery_target="immediate")
    return Recovery(options, fetched, wal_dir)


def replay_start(pgdata: Path, control: pgcontrol.Control) -> tuple[int, int]:
    """Where a replay onto the stopped copy starts, and on which timeline: a base backup's
    label, else the shutdown checkpoint (a copy that was not shut down cleanly is refused)."""
    label = pgcontrol.backup_label(pgdata)
    if label is not None:
        return label.start, label.timeline
    if not control.shut_down:
        raise StorageError(f"the base copy {pgdata} was not shut down cleanly; a replay needs "
                           f"the stopped copy a snapshot holds or a base backup")
    return control.checkpoint, control.timeline


async def check_reach(store: WalStore, start: int, timeline: int, lsn: int) -> None:
    """Refuse an inclusive LSN target that the stopped base (whose replay starts at `start` on
    `timeline`) and the WAL stored after it do not reach: one before the base (it already
    holds what came after it), or one whose record is not in storage (the stored WAL ends at
    or before it)."""
    if lsn < start:
        raise BeforeBase(f"{format_lsn(lsn)} is before the base, a copy of the database at "
                         f"{format_lsn(start)} (timeline {timeline}); the WAL "
                         f"before it is replayed only onto an older version")
    newest = await store.newest()
    if newest is None or newest[1] <= lsn:
        held = f"up to {format_lsn(newest[1])}" if newest else "none"
        raise OutOfReach(f"{format_lsn(lsn)} is beyond the WAL in storage after this base ({held})")


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
    except PostgresError as e:
        if "before configured recovery target was reached" in str(e):
            raise OutOfReach(f"the WAL in storage ends before the restore target (for a time: no "
                             f"transaction committed after it is stored yet): {e}") from e
        raise
    finally:
        await process.stop(60.0)
    shutil.rmtree(recovery.wal_dir, ignore_errors=True)
    control = pgcontrol.read(bindir, pgdata, run_as)
    if not control.shut_down or control.timeline <= recovery.fetched.timeline:
        raise StorageError(f"the replay of {pgdata} did not end in a promoted, cleanly stopped "
                           f"copy ({control}): {_tail(log_path)}")
    return control


__all__ = ["BeforeBase", "OutOfReach", "Recovery", "WalGap", "check_reach", "prepare", "replay", "replay_start",
           "restore_command"]
