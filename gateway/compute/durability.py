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
neither replayed onto it nor overwritten by it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from gateway.config import Settings
from storage.backend import Backend
from storage.wal import WalStore, format_lsn

from . import pgcontrol, walrestore
from .running import Instance
from .walship import WalShipper, remove_spool

log = logging.getLogger("pgsni.durability")


def enabled(settings: Settings) -> bool:
    return settings.durability != "snapshot"


def spool_of(data_root: Path, db_id: str) -> Path:
    """The shipper's spool: in the data root, outside every PGDATA (not a database id)."""
    return data_root / ".wal" / db_id


async def start_shipping(inst: Instance, settings: Settings, backend: Backend, data_root: Path,
                         base: str | None) -> None:
    """Start streaming the running instance's WAL to storage, under `base` (the stored version
    its copy descends from; raises if it cannot stream). A copy never stored yet (a database
    being created) ships nothing: its first version is what follows."""
    if not enabled(settings) or base is None:
        return
    await asyncio.to_thread(data_root.joinpath(".wal").mkdir, mode=0o700, exist_ok=True)
    shipper = WalShipper(backend, inst.db_id, inst.process.bindir, inst.socket_dir,
                         spool_of(data_root, inst.db_id), rpo_seconds=settings.rpo_seconds,
                         spool_budget=settings.wal_spool_mb << 20, base=base)
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


def shipping(inst: Instance) -> dict | None:
    """How the instance's WAL shipping stands (db info), or None without a shipper."""
    shipper = inst.shipper
    if shipper is None:
        return None
    stored = shipper.stored
    return {"stored_lsn": format_lsn(stored[1]) if stored else None,
            "timeline": stored[0] if stored else None, "lag_bytes": shipper.lag_bytes,
            "lag_seconds": round(shipper.lag_seconds, 3), "upload_errors": shipper.upload_errors,
            "paused": shipper.paused, "last_error": shipper.last_error}


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
    """The WAL store of the clean stopped copy descending from stored version `base`, if that
    holds WAL beyond the copy; else None. (`settings` None: whatever the durability mode.)"""
    control = inst.control
    if (settings is not None and not enabled(settings)) or control is None or not control.shut_down \
            or base is None:
        return None
    store = wal_store(backend, inst.db_id, control, base)
    return store if await behind_storage(store, inst.process.pgdata, control) else None


async def catch_up(inst: Instance, settings: Settings, backend: Backend, work: Path,
                   base: str | None) -> pgcontrol.Control | None:
    """Before a start: replay the WAL storage holds beyond the stopped copy (see the module
    doc). Returns the copy's new control data, or None if it was not behind. `work` is a
    directory for the fetched WAL (made and removed here)."""
    store = await _store_ahead(inst, settings, backend, base)
    if store is None:
        return None
    log.warning("the copy of %s is behind the WAL in storage (its last holder stopped without "
                "saving); replaying it", inst.db_id)
    return await _replay(inst, store, work, settings)


async def new_history(inst: Instance, settings: Settings, backend: Backend, work: Path,
                      base: str | None) -> pgcontrol.Control | None:
    """After a roll-back: promote the stopped copy to a new timeline without replaying any
    stored WAL, if storage holds WAL written after its version. None if nothing was needed."""
    store = await _store_ahead(inst, settings, backend, base)
    if store is None:
        return None
    control = inst.control
    end = await asyncio.to_thread(pgcontrol.checkpoint_end, inst.process.pgdata, control)
    if end is None:
        raise pgcontrol.ControlError(f"cannot find the end of the WAL of {inst.process.pgdata}")
    return await _replay(inst, store, work, settings, target_lsn=end, timeline=control.timeline)


async def replay_to(inst: Instance, settings: Settings, backend: Backend, work: Path,
                    base: str | None, target_time) -> pgcontrol.Control | None:
    """Restore to a point: replay the stored WAL beyond the stopped copy (a version saved before
    `target_time`) up to the transactions committed before `target_time`, and promote. None if
    storage holds no WAL beyond the copy (then the copy is the database at that time)."""
    store = await _store_ahead(inst, None, backend, base)
    if store is None:
        return None
    return await _replay(inst, store, work, settings, target_time=target_time)


async def _replay(inst: Instance, store: WalStore, work: Path, settings: Settings, **target) -> pgcontrol.Control:
    """Fetch and replay, to the end even if the caller is cancelled meanwhile: a replay cut off
    half-way would leave a copy that is neither the base nor the replayed database (and a
    recovery that runs out of fetched WAL promotes what it has)."""
    process = inst.process

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
