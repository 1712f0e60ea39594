"""Continuous durability (durability=async) around one database's instance: the WAL shipper's
start and stop (gateway/compute/walship.py), and bringing a stopped copy up to the WAL storage
holds beyond it (gateway/compute/walrestore.py) before it starts. The lifecycle
(gateway/compute/lifecycle.py) calls these at its transitions.

Why a copy may be behind storage: its holder shipped WAL while it ran and then died (a lost
machine, SIGKILL) before the stop-time snapshot, so the newest version in storage is older than
the newest commit; or the copy here is a clean one from an earlier run and another gateway has
run the database since. Either way the stored WAL beyond the copy's shutdown checkpoint is
replayed (archive recovery from a local directory, then promotion to a new timeline) before
clients see the database. A copy that was not shut down cleanly is never behind storage: it
holds at least what its shipper sent, and Postgres' own crash recovery replays it.

A roll-back to an older version starts a new history: the copy is promoted to a new timeline
before it runs (`new_history`), so WAL written after that version on its old timeline is
neither replayed onto it nor overwritten by it.

A copy that is an online base backup (gateway/compute/basebackup.py: it has a `backup_label`)
is always replayed before it starts, whatever the durability mode: from the backup's start
under the WAL prefix it continues (`base`), through its end, on to the newest stored WAL (a
roll-back to it: to its end only)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import shutil
from pathlib import Path

from gateway.config import Settings
from storage.backend import Backend
from storage.wal import WalStore, format_lsn

from . import pgcontrol, walrestore, walship
from .postgres import PostgresProcess
from .running import Instance
from .walship import WalShipper, remove_spool

log = logging.getLogger("pgsni.durability")


def enabled(settings: Settings) -> bool:
    """Whether WAL is shipped while databases run (async or sync)."""
    return settings.durability != "snapshot"


def spool_of(data_root: Path, db_id: str) -> Path:
    """The database's spools (one per version its WAL continued): in the data root, outside
    every PGDATA (not a database id)."""
    return data_root / ".wal" / db_id


def instance_options(inst: Instance, settings: Settings, base: str | None) -> None:
    """Before a launch: durability=sync makes the shipper's receiver the instance's synchronous
    standby, when a shipper will run (a database being created, with no stored version yet,
    ships nothing: its commits must not wait for a receiver that never comes)."""
    if settings.durability == "sync" and base is not None:
        inst.process.options = {**inst.process.options,
                                **walship.instance_options(settings.wal_keep_mb, sync=True)}



async def start_shipping(inst: Instance, settings: Settings, backend: Backend, data_root: Path,
                         base: str | None, count=lambda event, n: None) -> None:
    """Start streaming the running instance's WAL to storage, under `base` (the stored version
    its copy descends from; raises if it cannot stream). A copy never stored yet (a database
    being created) ships nothing: its first version is what follows."""
    if not enabled(settings) or base is None:
        return
    await asyncio.to_thread(data_root.joinpath(".wal").mkdir, mode=0o700, exist_ok=True)
    shipper = WalShipper(backend, inst.db_id, inst.socket_dir, spool_of(data_root, inst.db_id),
                         base=base, rpo_seconds=settings.rpo_seconds,
                         spool_budget=settings.wal_spool_mb << 20, sync=settings.durability == "sync",
                         sync_timeout=settings.sync_timeout_seconds, sync_fallback=settings.sync_fallback,
                         count=count, halting=lambda: inst.process.stopping)
    await shipper.start()
    inst.shipper = shipper


async def stop_shipping(inst: Instance, *, upload: bool, timeout: float) -> bool:
    """After the postmaster stopped: stop the shipper, uploading what it received unless not
    `upload` (fencing: storage is what failed). True if storage holds all of it; what is left
    stays in the spool for the next run."""
    shipper, inst.shipper = inst.shipper, None
    if shipper is None:
        return True
    done = await shipper.stop(timeout if upload else 0.0)
    if upload and not done:
        log.warning("WAL of %s is not all in storage yet (%s); the rest stays in %s and goes with "
                    "its next run", inst.db_id, shipper.last_error or "storage is slow", shipper.spool)
    return done


async def shipping(inst: Instance) -> dict | None:
    """How the instance's WAL shipping stands (db info), or None without a shipper. The
    instance's position is asked now: the watch's last answer may predate a commit."""
    shipper = inst.shipper
    if shipper is None:
        return None
    await shipper.ask_position()
    stored = shipper.stored
    return {"stored_lsn": format_lsn(stored[1]) if stored else None,
            "timeline": stored[0] if stored else None, "lag_bytes": shipper.lag_bytes,
            "lag_seconds": round(shipper.lag_seconds, 3), "upload_errors": shipper.upload_errors,
            "paused": shipper.paused, "last_error": shipper.last_error,
            "sync": shipper.sync, "degraded": shipper.degraded,
            "sync_fallbacks": shipper.fallbacks, "sync_failed_commits": shipper.failed_commits,
            "lost_bytes": shipper.lost_bytes,
            # WAL was lost and no base backup after it is current yet: restores reach only to then
            "lost_after": None if shipper.hole_after is None else
            dt.datetime.fromtimestamp(shipper.hole_after, dt.timezone.utc).isoformat()}


def lag(instances) -> tuple[int, float]:
    """The largest lag in bytes and in seconds of the given instances' WAL shipping (metrics)."""
    lags = [(i.shipper.lag_bytes or 0, i.shipper.lag_seconds) for i in instances if i.shipper is not None]
    return (max((b for b, _ in lags), default=0), max((t for _, t in lags), default=0.0))


def drop_spool(data_root: Path, db_id: str) -> None:
    """A deleted database's spool goes with it (backlogs and receiver log included)."""
    remove_spool(spool_of(data_root, db_id))


def wal_store(backend: Backend, db_id: str, control: pgcontrol.Control, base: str) -> WalStore:
    return WalStore(backend, db_id, segment_size=control.segment_size, base=base)


async def behind_storage(store: WalStore, pgdata: Path, control: pgcontrol.Control) -> bool:
    """Whether storage holds WAL beyond the clean copy `pgdata` (under its base): on a later
    timeline, or on its own past its shutdown checkpoint."""
    newest = await store.newest()
    if newest is None:
        return False
    timeline, lsn = newest
    if timeline != control.timeline:
        return timeline > control.timeline
    end = await asyncio.to_thread(pgcontrol.checkpoint_end, pgdata, control)
    return lsn > (end if end is not None else control.checkpoint)


async def _store_ahead(inst: Instance, settings: Settings | None, backend: Backend,
                       base: str | None) -> WalStore | None:
    """The WAL store (under `base`'s prefix) of the stopped copy, if that holds WAL beyond a
    clean copy, or if the copy is an online base backup (gateway/compute/basebackup.py: it
    cannot start without its WAL, whatever the durability mode); else None. (`settings`
    None: whatever the durability mode.)"""
    control = inst.control
    if control is None or base is None:
        return None
    backup = await asyncio.to_thread(pgcontrol.backup_label, inst.process.pgdata)
    if backup is None and ((settings is not None and not enabled(settings)) or not control.shut_down):
        return None
    store = wal_store(backend, inst.db_id, control, base)
    return store if backup or await behind_storage(store, inst.process.pgdata, control) else None


async def catch_up(inst: Instance, settings: Settings, backend: Backend, work: Path,
                   base: str | None) -> pgcontrol.Control | None:
    """Before a start: replay the WAL storage holds beyond the stopped copy (see the module
    doc). Returns the copy's new control data, or None if it was not behind. `work` is a
    directory for the fetched WAL (made and removed here)."""
    store = await _store_ahead(inst, settings, backend, base)
    if store is None:
        return None
    if inst.control.shut_down:
        log.warning("the copy of %s is behind the WAL in storage (its last holder stopped without "
                    "saving); replaying it", inst.db_id)
    else:
        log.info("the copy of %s is an online base backup; replaying the stored WAL", inst.db_id)
    return await _replay(inst.process, store, work, settings)


async def new_history(inst: Instance, settings: Settings, backend: Backend, work: Path,
                      base: str | None) -> pgcontrol.Control | None:
    """After a roll-back: promote the stopped copy to a new timeline without replaying any
    stored WAL, if storage holds WAL written after its version (a base backup: replaying its
    own WAL, up to its end). None if nothing was needed."""
    store = await _store_ahead(inst, settings, backend, base)
    if store is None:
        return None
    control = inst.control
    label = await asyncio.to_thread(pgcontrol.backup_label, inst.process.pgdata)
    if label is not None:  # a base backup: replayed to its end, the first consistent point
        return await _replay(inst.process, store, work, settings, immediate=True, timeline=label.timeline)
    end = await asyncio.to_thread(pgcontrol.checkpoint_end, inst.process.pgdata, control)
    if end is None:
        raise pgcontrol.ControlError(f"cannot find the end of the WAL of {inst.process.pgdata}")
    return await _replay(inst.process, store, work, settings, target_lsn=end, timeline=control.timeline)


async def replay_to(inst: Instance, settings: Settings, backend: Backend, work: Path,
                    base: str | None, **target) -> pgcontrol.Control | None:
    """Restore to a point: the stopped copy `inst` (of stored version `base`, saved before the
    target) plus the stored WAL, see `replay_copy`."""
    return await replay_copy(inst.process, inst.control, inst.db_id, backend, work, base, settings,
                             **target)


async def replay_copy(process: PostgresProcess, control: pgcontrol.Control | None, db_id: str,
                      backend: Backend, work: Path, base: str | None, settings: Settings, *,
                      target_time=None, target_lsn: int | None = None) -> pgcontrol.Control | None:
    """Replay the WAL stored for database `db_id` after version `base` onto the stopped copy
    `process` runs on (a copy of `base`), up to `target_time` (the transactions committed
    before it) or `target_lsn` (up to and including the record at that LSN), and promote.
    None if the target is a time and storage holds no WAL beyond the copy (then the copy is
    the database at that time); an LSN is always checked against the copy and the stored WAL
    (walrestore.OutOfReach: before the copy, or past what storage holds)."""
    if control is None or base is None:
        return None
    backup = await asyncio.to_thread(pgcontrol.backup_label, process.pgdata)
    if backup is None and not control.shut_down:
        return None
    store = wal_store(backend, db_id, control, base)
    if target_lsn is not None:
        return await _replay(process, store, work, settings, target_lsn=target_lsn, inclusive=True)
    if backup is None and not await behind_storage(store, process.pgdata, control):
        return None  # an online base backup always replays: it cannot start without its WAL
    return await _replay(process, store, work, settings, target_time=target_time)


async def _replay(process: PostgresProcess, store: WalStore, work: Path, settings: Settings,
                  **target) -> pgcontrol.Control:
    """Fetch and replay, to the end even if the caller is cancelled meanwhile: a replay cut off
    half-way would leave a copy that is neither the base nor the replayed database (and a
    recovery that runs out of fetched WAL promotes what it has)."""

    async def run() -> pgcontrol.Control:
        try:
            recovery = await walrestore.prepare(process.pgdata, store, work, process.bindir,
                                                process.run_as, **target)
            return await walrestore.replay(
                recovery, process.bindir, process.pgdata, process.socket_dir, process.log_path,
                process.run_as, process.options, timeout=max(settings.start_timeout, 600.0))
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    task = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task  # finish first, then give in to the cancellation
        raise
