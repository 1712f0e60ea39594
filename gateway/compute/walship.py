"""The WAL shipper of one running instance: the gateway's own receiver (walreceiver.py) streams
the instance's WAL over its private socket into a gateway-owned spool, and an upload loop
stores it through storage/wal.py: what arrived since the last upload as a piece of the
segment being written, at least every `rpo_seconds` / 2 (durability=async) or at once
(durability=sync), and each segment whole once it is complete. The instance never sees
storage or its credentials. In durability=async the receiver lets WAL gather between batches
(up to `rpo_seconds` / 20, `_linger`), sparing a wake-up per commit.

How it connects. The receiver logs in as the gateway's admin role by peer authentication on
the instance's socket: pg_hba.conf has `local replication pgsni_admin peer` (dbroles.hba) and
no other replication line, so no tenant role can open a replication connection whatever
attributes it gets. The instance needs wal_level replica and a free WAL sender and slot
(`instance_options`, Postgres' defaults already).

What the instance hears as flushed: only what storage holds, in both modes, so the slot
(below) keeps in Postgres whatever the spool could still lose (the spool is not fsynced per
batch: walreceiver.py). In durability=sync the instance runs with the receiver as its
synchronous standby (`synchronous_standby_names`, `instance_options`), so a commit returns to
its client once its WAL is in storage. Commits that arrive while an upload runs wait for the next one and go together.
When storage takes no WAL for `sync_timeout` seconds, `sync_fallback` decides: "fail" ends
the sessions whose commits wait (their clients get an error, not an acknowledgement; the
instance has the commit locally, storage may not), until storage takes WAL again; "async"
reports the spool's position instead, fsyncing each batch first (commits go on, acknowledged
before they are in storage), logs it, counts it (`fallbacks`), and goes back to sync once storage caught up.

The spool (`<spools>/<base>`, e.g. `<data_root>/.wal/<id>/<version>`) is a 0700 directory
of the gateway's OS user outside PGDATA, so the instance's OS user cannot read or plant files
there; one per stored version the WAL continues, so what a run left (the gateway died, or
storage was down at its stop) goes to its own version's prefix even after the database was
restored to another. A spool file is deleted only once storage holds it. When storage is down
the spool grows; past `spool_budget` bytes the receiver is disconnected and Postgres keeps the
WAL instead (the slot below), until the spool has drained to half the budget. `lag_bytes` says
how far storage is behind the instance's flushed WAL, `last_error` and `upload_errors` why.

The slot `pgsni_walship` (physical, made with WAL reserved from the last checkpoint's redo
point) makes Postgres keep every segment the receiver has not reported flushed, across
receiver restarts and pauses. A new stream starts where the spool or storage ends (whichever
is further), or, with neither, at the start of the segment of the slot's position. A slot
lives in PGDATA (`pg_replslot/`), so it travels in snapshots: a copy restored elsewhere
brings it along, and if no shipper runs there it would hold WAL back without end. So
instances run with `max_slot_wal_keep_size` (`instance_options`), walrestore.py drops the
slot from a copy it prepares for replay (the next shipper makes a new one), and a database
that runs without a shipper should have it dropped too (`forget_slot`, on the stopped copy).

WAL the instance has flushed is never rewritten (since Postgres 15 a crash that cut a record
in two marks the gap with an overwrite-contrecord record instead), so a piece's content can
never change under its name.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import psycopg
from psycopg.conninfo import make_conninfo

from gateway.wire.protocol import ProtocolViolation
from storage.backend import Backend
from storage.errors import StorageError
from storage.ids import valid_version
from storage.wal import StoredWal, WalConflict, WalStore, format_lsn, parse_lsn, parse_segment_name

from . import dbroles
from .walreceiver import APP, SLOT, WalReceiver, close_leftovers, parse_part_name

log = logging.getLogger("pgsni.walship")

CONSOLIDATE = 64  # pieces of one segment before one piece from its start replaces them
INLINE = 256 << 10  # pieces up to this size are read in the event loop (page cache, microseconds)
FALLBACKS = ("fail", "async")
LINGER = 0.05  # seconds the receiver lets WAL gather in durability=async (_linger)
SLOT_POSITION = "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s"


def instance_options(keep_wal_mb: int = 4096, *, sync: bool = False) -> dict[str, str]:
    """Settings an instance needs while a shipper streams from it: pinned on the command line,
    so neither an imported postgresql.conf nor ALTER SYSTEM turns them off. `sync`: the
    receiver is the synchronous standby (durability=sync)."""
    options = {"wal_level": "replica", "max_wal_senders": "4", "max_replication_slots": "4",
               "max_slot_wal_keep_size": f"{keep_wal_mb}MB"}
    if sync:
        options["synchronous_standby_names"] = f'"{APP}"'
    return options


def forget_slot(pgdata: Path) -> None:
    """Drop the shipper's slot from a stopped data directory (Postgres reads pg_replslot/ at
    start; a base backup leaves it out the same way)."""
    shutil.rmtree(pgdata / "pg_replslot" / SLOT, ignore_errors=True)


def remove_spool(spools: Path) -> None:
    """Remove a database's spools (one per version its WAL continued), and what the earlier
    pg_receivewal-based shipper left beside them (`<id>.backlog-*`, `<id>.log*`)."""
    shutil.rmtree(spools, ignore_errors=True)
    for path in spools.parent.glob(f"{spools.name}.*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def replication_conninfo(socket_dir: Path) -> str:
    """A libpq replication connection string as the admin (pg_basebackup, pg_receivewal)."""
    return make_conninfo(host=str(socket_dir), user=dbroles.ADMIN, application_name=APP,
                         connect_timeout=dbroles.CONNECT_TIMEOUT)


class WalShipper:
    """Ships one instance's WAL to `backend` under database `db_id` (see the module doc)."""

    def __init__(self, backend: Backend, db_id: str, socket_dir: Path, spools: Path, *, base: str,
                 rpo_seconds: float = 1.0, spool_budget: int = 1 << 30, sync: bool = False,
                 sync_timeout: float = 10.0, sync_fallback: str = "fail",
                 count: Callable[[str, int], None] = lambda event, n: None,
                 halting: Callable[[], bool] = lambda: False) -> None:
        """`base`: the stored version the instance's copy descends from (storage/wal.py);
        `spools`: the database's spool directory (one spool per base in it); `count(event,
        n)`: durability=sync's "fallback" and "failed_commits", and "lost_bytes" (WAL removed
        before storage held it), for the metrics; `halting()`:
        whether the instance is being stopped (`_flush_report`)."""
        if sync_fallback not in FALLBACKS:
            raise ValueError(f"sync_fallback must be one of {FALLBACKS}")
        if not valid_version(base):  # it names a directory in `spools`: one plain component
            raise StorageError(f"database {db_id}: {base!r} is not a version; its WAL is not shipped")
        self.backend, self.db_id, self.base = backend, db_id, base
        self.socket_dir, self.spools, self.spool = socket_dir, spools, spools / base
        self.rpo_seconds, self.spool_budget = rpo_seconds, spool_budget
        self.sync, self.sync_timeout, self.sync_fallback = sync, sync_timeout, sync_fallback
        self._count, self._halting = count, halting
        self.partial_every = rpo_seconds / 2  # a commit waits at most this, plus one upload
        self.poll = min(0.2, rpo_seconds / 4)
        self.store: WalStore | None = None
        self.stored: tuple[int, int] | None = None  # (timeline, LSN) storage holds up to
        self.flushed: int | None = None  # the instance's flushed WAL, when last asked
        self.receiver: WalReceiver | None = None
        self.upload_errors = 0  # failed rounds in all
        self.last_error: str | None = None
        self.failed: WalConflict | None = None  # fatal: someone else writes this history
        self.paused = False  # receiver disconnected for the spool budget
        self.degraded = False  # sync_fallback=async in force: commits no longer wait for storage
        self._spool_lock = threading.RLock()  # spool files are written, closed and renamed under it
        self.fallbacks = 0  # times sync fell back to async
        self.failed_commits = 0  # sessions ended with their commit waiting (sync_fallback=fail)
        self.lost_bytes = 0  # WAL Postgres removed before storage held it (_start_point)
        # where the last such loss ends (timeline, LSN): no stored version restores past it
        # until a base backup taken after it is current (`base_taken`)
        self.hole: tuple[int, int] | None = None
        self.hole_after: float | None = None  # until then (unix time) restores reach, meanwhile
        self._hole_since = 0.0  # when the hole was found (monotonic)
        self._stored_at = time.time()  # when `stored` last moved (unix time)
        self._failing = 0  # failed rounds in a row: the retry backs off
        self._listings: dict[str, StoredWal] = {}  # base -> what its prefix holds (kept current)
        self._unstored: collections.deque[tuple[int, float]] = collections.deque()  # (written, first arrived)
        self._arrived = asyncio.Event()
        self._partial_at = 0.0
        self._asked_at = 0.0
        self._caught_up_at = time.monotonic()
        self._retry_at = 0.0
        self._streaming_since: float | None = None
        self._down_since = time.monotonic()
        self._waiters: dict[tuple, float] = {}  # (pid, transaction start) -> first seen waiting
        self._conn: psycopg.AsyncConnection | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._asking = asyncio.Lock()

    # --- what the lifecycle reads ----------------------------------------------------------------
    @property
    def stored_lsn(self) -> int | None:
        return self.stored[1] if self.stored else None

    @property
    def lag_bytes(self) -> int | None:
        if self.flushed is None:
            return None
        return max(0, self.flushed - (self.stored_lsn or 0))

    @property
    def lag_seconds(self) -> float:
        """How long the oldest WAL received and not in storage has waited; without a receiver,
        how long storage has been behind the instance's flushed WAL (0: caught up)."""
        now = time.monotonic()
        if self._unstored:
            return now - self._unstored[0][1]
        lag = self.lag_bytes
        return 0.0 if not lag or self.receiver is not None else now - self._caught_up_at

    # --- start and stop --------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the instance, make the slot, start the receiver, the upload loop and the
        watch. Raises if the instance cannot stream."""
        await asyncio.to_thread(self._prepare_spool)
        try:
            await self._begin()
        except BaseException:
            await self._close_conn()
            raise
        self._tasks = [asyncio.create_task(self._receive_loop(), name=f"walrecv-{self.db_id}"),
                       asyncio.create_task(self._upload_loop(), name=f"walship-{self.db_id}"),
                       asyncio.create_task(self._watch(), name=f"walship-watch-{self.db_id}")]

    async def _begin(self) -> None:
        conn = await self._connect()
        row = await (await conn.execute(
            "SELECT current_setting('wal_level'), current_setting('max_wal_senders')::int, "
            "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')")).fetchone()
        wal_level, senders, segment_size = row
        if wal_level not in ("replica", "logical") or senders < 1:
            raise StorageError(f"database {self.db_id} cannot stream its WAL: wal_level={wal_level}, "
                               f"max_wal_senders={senders} (needs replica and at least 1)")
        await conn.execute("SELECT pg_create_physical_replication_slot(%s, true) WHERE NOT EXISTS "
                           "(SELECT FROM pg_replication_slots WHERE slot_name = %s)", (SLOT, SLOT))
        self.store = self._store(self.base, int(segment_size))
        try:
            self.stored = (await self._listing(self.base)).newest()
        except StorageError as e:
            self._failed_round(e)

    def _store(self, base: str, segment_size: int | None = None) -> WalStore:
        size = segment_size or self.store.segment_size
        return WalStore(self.backend, self.db_id, segment_size=size, base=base)

    async def _listing(self, base: str) -> StoredWal:
        if base not in self._listings:
            self._listings[base] = await self._store(base).listing()
        return self._listings[base]

    async def stop(self, timeout: float = 30.0) -> bool:
        """After the instance stopped: take in the end of its stream, stop the receiver, and
        upload what is left, trying until `timeout` or until storage fails. True if the spool
        is empty: storage then holds all the WAL received. What is left stays in the spool for
        the next run."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        receive, *others = self._tasks or [None]
        for task in others:
            task.cancel()
        if receive is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(receive), min(5.0, max(0.1, timeout / 3)))
            receive.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self._close_leftovers)  # no receiver writes any more
        done, failures = False, self.upload_errors
        while self.failed is None and not done and time.monotonic() < deadline:
            try:
                done = await asyncio.wait_for(self._round(due=True), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if not done and self.upload_errors > failures:
                break  # storage fails: the spool keeps the rest for the next run
            if not done:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        await self._close_conn()
        return done

    def _prepare_spool(self) -> None:
        self.spools.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.spools, self.spool):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
        self._close_leftovers()  # before anything reads the spool: a dead process's files

    def _close_leftovers(self) -> None:
        """In every spool, the current one and those of versions the copy has moved on from
        (whose WAL nobody streams again): a `.part` a dead process left after the machine
        restarted may end in zeros, and is never uploaded."""
        with self._spool_lock:  # a cancelled receiver's thread may still be closing its file
            for spool in self._spools():
                close_leftovers(spool, current=spool == self.spool)

    # --- receiving -------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        """Keep a receiver streaming (a new one after the instance ended a stream, a network
        hiccup on the socket, or a pause), backing off while it keeps failing."""
        failures = 0
        while self.failed is None and not self._stopping:
            if self.paused:
                await asyncio.sleep(self.poll)
                continue
            receiver = WalReceiver(self.socket_dir, self.spool, self.store.segment_size,
                                   flushed=self._flush_report, on_written=self._written,
                                   fsync_batches=lambda: self.degraded, linger=self._linger,
                                   files_lock=self._spool_lock)
            began = time.monotonic()
            try:
                await receiver.connect()
                timeline, server_end = await receiver.identify()
                await receiver.fetch_history(timeline)
                start = await self._start_point(timeline, server_end)
                self.receiver, self._streaming_since = receiver, time.monotonic()
                await receiver.stream(start)
            except WalConflict as e:
                self._fail(e)
            except (StorageError, OSError, ProtocolViolation, psycopg.Error) as e:
                if not self._stopping and not self.paused:
                    self.last_error = f"WAL receiver: {e}"
                    log.warning("WAL receiver of %s: %s", self.db_id, e)
            except Exception as e:  # noqa: BLE001 -- a bug must not end receiving for good
                self.last_error = f"WAL receiver: {e!r}"
                log.exception("WAL receiver of %s failed", self.db_id)
            finally:
                # down since the last stream that ran: one refused at its start (no WAL position
                # yet) did not, or retries refused at once would keep stuck_for near 0 for ever
                if self._streaming_since is not None and receiver.written is not None:
                    self._down_since = time.monotonic()
                self.receiver, self._streaming_since = None, None
                await receiver.close()
            failures = 0 if time.monotonic() - began > 30 else failures + 1
            if not self._stopping:
                await asyncio.sleep(min(10.0, 0.2 * failures))

    async def _start_point(self, timeline: int, server_end: int) -> int:
        """Where a new stream starts: where the spool or storage ends on this timeline, or the
        segment of the slot's position if that is further (WAL between is lost to shipping:
        Postgres no longer has it)."""
        conn = await self._connect()
        row = await (await conn.execute(SLOT_POSITION, (SLOT,))).fetchone()
        if not (row and row[0]):
            row = await self._renew_slot(conn)
        restart = parse_lsn(row[0]) if row and row[0] else server_end
        size = self.store.segment_size
        stored = self.stored
        if stored is not None and (stored[0] > timeline or (stored[0] == timeline and stored[1] > server_end)):
            raise WalConflict(f"storage holds WAL of {self.db_id} at timeline {stored[0]} "
                              f"{format_lsn(stored[1])}, beyond this copy (timeline {timeline} "
                              f"{format_lsn(server_end)}): another writer went on with its history")
        ends = [stored[1]] if stored is not None and stored[0] == timeline else []
        local = await asyncio.to_thread(self._spool_end, timeline)
        if local is not None and local > server_end:  # not this copy's history: start from storage
            log.error("the WAL spool of %s ends at %s, beyond the instance's %s: not streamed on from "
                      "there", self.db_id, format_lsn(local), format_lsn(server_end))
        elif local is not None:
            ends.append(local)
        if ends and max(ends) >= restart:
            return max(ends)
        start = restart - restart % size
        lost = start - max(ends) if ends else 0
        if lost > 0:
            self.hole, self.hole_after, self._hole_since = (timeline, start), self._stored_at, time.monotonic()
            self.lost_bytes += lost
            self._count("lost_bytes", lost)
            log.error("WAL of %s from %s to %s is not in storage and no longer on the instance: "
                      "restores past it need the next stored version", self.db_id,
                      format_lsn(max(ends)), format_lsn(start))
        return start

    async def _renew_slot(self, conn: psycopg.AsyncConnection):
        """Make the slot again if Postgres invalidated it (storage lacked more WAL than
        max_slot_wal_keep_size, so Postgres dropped WAL the slot held) or it is gone: such a
        slot has no position, and from Postgres 18 on cannot be streamed from at all, so the
        receiver would be refused for good (the slot travels in snapshots, so across restarts
        too). The new one holds WAL from the last checkpoint's redo point; the caller logs
        the WAL lost between."""
        log.error("the WAL slot of %s was invalidated or dropped (Postgres removed WAL that storage "
                  "lacked): made again", self.db_id)
        await conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                           "WHERE slot_name = %s", (SLOT,))
        await conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (SLOT,))
        return await (await conn.execute(SLOT_POSITION, (SLOT,))).fetchone()

    def _spool_end(self, timeline: int) -> int | None:
        """Where the WAL of `timeline` in the own spool ends (its newest file's end)."""
        ends = [begin + size for tli, begin, size, _, _ in self._files(self.spool) if tli == timeline]
        return max(ends, default=None)

    def _flush_report(self, written: int, synced: int) -> int:
        """What the receiver tells the instance is flushed (see the module doc). Once the
        instance is being stopped: 0 (not known). Its walsender ends the stream at shutdown
        only when the flushed position it was told (or, with none, the written one) reaches
        what it sent: with storage down, a fast shutdown would wait for storage until it is
        killed, leaving a copy that was not shut down cleanly. No commit waits then (its
        backends are gone first), and 0 does not move the slot: the spool has the WAL, the
        instance keeps it too."""
        if self._halting():
            return 0
        if self.degraded:
            return synced
        if self.sync and self.hole is not None:
            return 0  # what follows a hole restores only from a base backup after it (base_taken)
        stored = self.stored
        timeline = self.receiver.timeline if self.receiver else None
        if stored is None or stored[0] != timeline:
            return 0  # nothing of this timeline in storage yet (0: not known)
        return min(written, stored[1])

    def _linger(self) -> float:
        """How long the receiver lets WAL gather between small batches: never while commits
        wait for it (durability=sync, also fallen back: they wait for its reports), else a
        twentieth of the RPO, at most LINGER seconds."""
        return 0.0 if self.sync else min(LINGER, self.rpo_seconds / 20)

    def _written(self, written: int) -> None:
        now = time.monotonic()
        if self._unstored and now - self._unstored[-1][1] < 0.05:
            self._unstored[-1] = (written, self._unstored[-1][1])  # a few entries a second at most
        else:
            self._unstored.append((written, now))
        self._arrived.set()
        behind = written - (self.stored_lsn or written)
        if behind > self.spool_budget and not self.paused:  # at once: the watch looks only now and then
            self._pause(behind)

    def _pause(self, spooled: int) -> None:
        self.paused = True
        log.error("WAL spool of %s holds %d bytes, over its budget of %d: receiver paused, "
                  "Postgres keeps the WAL until storage takes it", self.db_id, spooled, self.spool_budget)
        if self.receiver is not None:
            asyncio.ensure_future(self.receiver.close())

    # --- uploading -------------------------------------------------------------------------------
    async def _upload_loop(self) -> None:
        while self.failed is None:
            now = time.monotonic()
            due = self.sync or now - self._partial_at >= self.partial_every
            try:
                if now >= self._retry_at:
                    self._arrived.clear()
                    if due:
                        self._partial_at = now
                    await self._round(due=due)
            except Exception as e:  # noqa: BLE001 -- a bug must not end shipping for good
                log.exception("WAL shipping of %s failed a round", self.db_id)
                self._failed_round(e)
            wait = max(0.01, min(self.poll, self._partial_at + self.partial_every - time.monotonic()))
            if self.sync and time.monotonic() >= self._retry_at:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), self.poll)
            else:
                await asyncio.sleep(wait)

    async def _round(self, *, due: bool) -> bool:
        """One pass over the spools: other versions' first, then this one's. `due`: also what
        arrived in the segment being written. True if nothing is left to upload."""
        try:
            empty = True
            for spool, histories, files in await asyncio.to_thread(self._scan):
                empty = await self._ship(spool, histories, files, due=due) and empty
            self._failing = 0
        except WalConflict as e:
            self._fail(e)
            return False
        except (StorageError, OSError) as e:
            self._failed_round(e)
            return False
        return empty

    def _spools(self) -> list[Path]:
        others = sorted(p for p in self.spools.iterdir() if p.is_dir() and p != self.spool)
        return [*others, self.spool]

    def _scan(self) -> list[tuple[Path, list[Path], list[tuple[int, int, int, str, Path]]]]:
        """Each spool with its history files and WAL files (one thread hop per round)."""
        return [(spool, sorted(spool.glob("*.history")), self._files(spool)) for spool in self._spools()]

    def _fail(self, e: WalConflict) -> None:
        self.failed = e
        log.error("WAL shipping of %s stopped: %s", self.db_id, e)

    def _failed_round(self, e: Exception) -> None:
        self.upload_errors += 1
        self._failing += 1
        self.last_error = str(e)
        cap = 1.0 if self.sync else 10.0  # sync: commits wait for the retry
        self._retry_at = time.monotonic() + min(cap, 0.5 * 2 ** min(self._failing, 5))
        log.warning("WAL of %s not uploaded (lag %s bytes): %s", self.db_id, self.lag_bytes, e)

    async def _ship(self, spool: Path, histories: list[Path], files, *, due: bool) -> bool:
        """Upload one spool's history files, then its WAL files in order (`_scan`), deleting
        each once storage holds it (the one being written: never). True if the spool is empty."""
        own = spool == self.spool
        store = self.store if own else self._store(spool.name)
        listing = await self._listing(spool.name)
        for path in histories:
            await store.put_history(path.name, await asyncio.to_thread(path.read_bytes))
            listing.histories[int(path.name[:8], 16)] = store.prefix + path.name
            await asyncio.to_thread(path.unlink)
        receiver = self.receiver if own else None
        left = False
        for tli, begin, size, kind, path in files:
            live = own and kind == "part"  # a receiver writes it: never deleted here
            if live:
                written = receiver.written if receiver is not None and path == receiver.current_file else None
                size = min(size, written - begin) if written is not None else size
                if not due:
                    left = True
                    continue
            try:
                await self._upload_file(store, listing, tli, begin, size, kind == "full", path)
            except FileNotFoundError:
                left = True  # closed and renamed meanwhile: the next round ships it, then the rest
                break
            if live:
                left = True
            else:
                await asyncio.to_thread(path.unlink)
        if not own and not left:
            await asyncio.to_thread(shutil.rmtree, spool, True)
        return not left

    async def _upload_file(self, store: WalStore, listing: StoredWal, tli: int, begin: int, size: int,
                           full: bool, path: Path) -> None:
        """Store what storage lacks of one spool file: the whole segment if the file holds it
        all, else the bytes past what is stored as a piece (now and then one from the segment's
        start instead, replacing the pieces before it)."""
        seg_size = store.segment_size
        segno, offset = divmod(begin, seg_size)
        seg = (tli, segno)
        name = path.name.split(".")[0]
        if seg in listing.segments:
            return
        if full and offset == 0:
            key = await store.put_segment(name, await asyncio.to_thread(_read, path, 0, seg_size))
            listing.segments[seg] = key
            await self._forget_superseded(listing)
            self._advance(store, tli, (segno + 1) * seg_size, segno * seg_size)
            return
        reach = listing.cover(*seg)[0] if seg in listing.partials else 0
        end = offset + size
        if end <= reach:
            return
        start = max(reach, offset)
        consolidate = len(listing.cover(*seg)[1]) + 1 >= CONSOLIDATE
        if consolidate:
            start = offset  # one piece from where the file begins replaces the ones in it
        if end - start <= INLINE:  # what a commit or a few add: no thread hop
            data = _read(path, start - offset, end - start)
        else:
            data = await asyncio.to_thread(_read, path, start - offset, end - start)
        key = await store.put_partial(name, data, start)
        listing.partials.setdefault(seg, []).append((start, end, key))
        if consolidate:
            await self._forget_superseded(listing)
        self._advance(store, tli, segno * seg_size + end, segno * seg_size + start)

    async def _forget_superseded(self, listing: StoredWal) -> None:
        """Delete pieces storage no longer needs (best effort: retention and
        `WalStore.remove_superseded` catch what is left)."""
        keys = set(listing.superseded())
        if not keys:
            return
        for seg, found in list(listing.partials.items()):
            listing.partials[seg] = [p for p in found if p[2] not in keys]
        try:
            await self.backend.delete(sorted(keys))
        except StorageError as e:
            log.info("could not delete superseded WAL of %s: %s", self.db_id, e)

    def _advance(self, store: WalStore, tli: int, lsn: int, start: int) -> None:
        """Storage now holds this instance's WAL from `start` to `lsn` on timeline `tli`. In
        durability=sync what storage holds counts only without a hole (it is what commits are
        acknowledged for): WAL stored past one does not move `stored`."""
        if store is not self.store or (self.stored is not None and (tli, lsn) <= self.stored):
            return
        if self.sync and self.stored is not None and self.stored[0] == tli and start > self.stored[1] \
                and (tli, start) != self.hole:  # the hole of a loss counted (_start_point) is known
            log.warning("WAL of %s stored from %s, past a hole at %s: not counted as stored",
                        self.db_id, format_lsn(start), format_lsn(self.stored[1]))
            return
        self.stored, self._stored_at = (tli, lsn), time.time()
        while self._unstored and self._unstored[0][0] <= lsn:
            self._unstored.popleft()
        if self.receiver is not None:
            self.receiver.report()  # durability=sync: the commits waiting for this return now

    def base_taken(self, timeline: int, start_lsn: int) -> None:
        """A base backup that starts at `start_lsn` is the current version now: a hole before
        it no longer keeps what follows from being restored (in durability=sync, the commits
        held for it return)."""
        if self.hole is not None and (timeline, start_lsn) >= self.hole:
            log.info("WAL of %s after the loss at %s is restorable again (base backup from %s)",
                     self.db_id, format_lsn(self.hole[1]), format_lsn(start_lsn))
            self.hole = self.hole_after = None
            if self.receiver is not None:
                self.receiver.report()

    def _files(self, spool: Path) -> list[tuple[int, int, int, str, Path]]:
        """The WAL files of a spool in order: (timeline, LSN of its first byte, size, kind, path)."""
        files = []
        seg_size = self.store.segment_size
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(spool):
                parsed = parse_part_name(entry.name)
                seg = parsed and parse_segment_name(parsed[0], seg_size)
                if not seg:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    size = entry.stat().st_size
                    files.append((seg[0], seg[1] * seg_size + parsed[1], size, parsed[2], Path(entry.path)))
        return sorted(files)

    # --- the watch: budget, position, sync timeout -----------------------------------------------
    async def _watch(self) -> None:
        """The spool budget, the instance's position and the sync timeout, on their own beat:
        an upload that hangs on storage for its whole retry budget does not hold them up."""
        while self.failed is None:
            try:
                await self._budget()
                if time.monotonic() - self._asked_at >= self.partial_every:
                    await self.ask_position()  # lag keeps growing while storage is down
                if self.sync:
                    await self._sync_timeout()
            except Exception:  # noqa: BLE001
                log.exception("watching the WAL shipping of %s failed", self.db_id)
            await asyncio.sleep(self.poll)

    def stuck_for(self) -> float:
        """How long the oldest WAL received but not in storage has waited (0: none waits), or
        how long no receiver has streamed; after WAL was lost to shipping, at least how long
        ago (what follows is not restorable until a base backup after it is current)."""
        now = time.monotonic()
        if self._streaming_since is None:
            stuck = now - self._down_since
        else:
            stuck = now - self._unstored[0][1] if self._unstored else 0.0
        return max(stuck, now - self._hole_since) if self.hole is not None else stuck

    async def _sync_timeout(self) -> None:
        stuck = self.stuck_for()
        if self.degraded and not self._unstored and self.hole is None and self.receiver is not None:
            self.degraded = False
            log.warning("WAL of %s is in storage again: commits wait for storage again (durability=sync)",
                        self.db_id)
        if self.sync_fallback == "async":
            if stuck >= self.sync_timeout and not self.degraded:
                self.degraded, self.fallbacks = True, self.fallbacks + 1
                self._count("fallback", 1)
                log.error("storage has taken no WAL of %s for %.0f s: commits are acknowledged "
                          "before their WAL is in storage until it catches up (sync_fallback=async)",
                          self.db_id, stuck)
                if self.receiver is not None:
                    await self.receiver.sync_spool()
                    self.receiver.report()
            if not self.paused:
                return
            # the spool is over its budget, so no receiver is connected to acknowledge a commit,
            # falling back or not: commits would wait for it without end; they fail as below
        if stuck < min(0.5, self.sync_timeout / 2):
            self._waiters.clear()
            return
        try:
            await self._end_waiting_commits()
        except (psycopg.Error, OSError):
            await self._close_conn()  # the instance is stopping: nothing waits any more

    async def _end_waiting_commits(self) -> None:
        """sync_fallback=fail, or any fallback while the spool is over its budget (no receiver
        then): end the sessions whose commit has waited for storage for
        `sync_timeout` (as seen from here: each waiting transaction is timed from when it was
        first seen waiting)."""
        conn = await self._connect()
        rows = await (await conn.execute(
            "SELECT pid, xact_start FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
            "AND backend_type = 'client backend'")).fetchall()
        now = time.monotonic()
        self._waiters = {key: self._waiters.get(key, now) for key in map(tuple, rows)}
        due = [pid for (pid, _), since in self._waiters.items() if now - since >= self.sync_timeout]
        if not due:
            return
        rows = await (await conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid",
                                         (due,))).fetchall()
        ended = sum(1 for (ok,) in rows if ok)
        self.failed_commits += ended
        self._count("failed_commits", ended)
        why = ("the WAL spool is over its budget" if self.paused else
               "WAL before it was lost to shipping, and no base backup after the loss is stored yet"
               if self.hole is not None else "sync_fallback=fail")
        log.error("a commit of %s waited %.0f s for storage to take its WAL: %d session(s) ended "
                  "unacknowledged (%s)", self.db_id, self.sync_timeout, ended, why)

    def spooled_bytes(self) -> int:
        total = 0
        for spool in self._spools():
            total += sum(size for _, _, size, _, _ in self._files(spool))
        return total

    async def _budget(self) -> None:
        """Disconnect the receiver while the spool is over budget."""
        spooled = await asyncio.to_thread(self.spooled_bytes)
        if not self.paused and spooled > self.spool_budget:
            self._pause(spooled)
        elif self.paused and spooled <= self.spool_budget // 2:
            self.paused = False
            log.info("WAL spool of %s drained: receiver resumed", self.db_id)

    # --- the instance's position -----------------------------------------------------------------
    async def _connect(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await dbroles.connect(self.socket_dir, app=f"{APP}-watch")
        return self._conn

    async def ask_position(self) -> None:
        """Ask the instance how far its WAL is flushed (the watch, and db info, which must not
        read a lag from before the latest commit). One asks at a time, on one connection."""
        async with self._asking:
            if self._stopping:
                return
            self._asked_at = time.monotonic()
            try:
                conn = await self._connect()
                row = await (await conn.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone()
                self.flushed = parse_lsn(row[0])
                if (self.stored_lsn or 0) >= self.flushed:
                    self._caught_up_at = time.monotonic()
            except (psycopg.Error, OSError):
                await self._close_conn()  # the instance is stopping, or restarting: ask again later

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path} holds {offset + len(data)} bytes, expected {offset + length}")
    return data
