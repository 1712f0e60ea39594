"""The WAL shipper of one running instance: `pg_receivewal` (the database's own major's) streams
its WAL over the private socket into a gateway-owned spool, and an upload loop stores each
completed segment, and the segment being written at least every `rpo_seconds`, through
storage/wal.py. The instance never sees storage or its credentials.

How it connects. pg_receivewal logs in as the gateway's admin role by peer authentication on
the instance's socket: pg_hba.conf has `local replication pgsni_admin peer` (dbroles.hba) and
no other replication line, so no tenant role can open a replication connection whatever
attributes it gets. The instance needs wal_level replica and a free WAL sender and slot
(`instance_options`, Postgres' defaults already). The child's environment is `clean_env()`.

The spool (`spool`, e.g. `<data_root>/.wal/<id>`) is a 0700 directory of the gateway's OS user
outside PGDATA, so the instance's OS user cannot read or plant files there. A spool file is
deleted only once storage holds it. When storage is down the spool grows; past
`spool_budget` bytes the receiver is paused and Postgres keeps the WAL instead (the slot
below), until the spool has drained to half the budget. `lag_bytes` says how far storage is
behind the instance's flushed WAL, `last_error` and `upload_errors` why.

The slot `pgsni_walship` (physical, made with WAL reserved from the last checkpoint's redo
point) makes Postgres keep every segment the receiver has not confirmed, across receiver
restarts and pauses; a fresh receiver starts at the slot's position. A slot lives in PGDATA
(`pg_replslot/`), so it travels in snapshots: a copy restored elsewhere brings it along, and
if no shipper runs there it would hold WAL back without end. So instances run with
`max_slot_wal_keep_size` (`instance_options`), walrestore.py drops the slot from a copy it
prepares for replay (the next shipper makes a new one), and a database that runs without a
shipper should have it dropped too (`forget_slot`, on the stopped copy).

Partial segments. pg_receivewal (run with --synchronous: it fsyncs what it receives and at
once tells the server how far it got, which moves the slot) fills `<segment>.partial`, which
it created full of zeros, in order. So whatever the file holds when read is a true prefix of
the stream followed by zeros. The upload is the prefix up to the receiver's confirmed position
(asked just before the read), or up to the last non-zero byte if that is further: named by its
length (storage/wal.py), its content can never change under that name, and zeros cut off are
zeros again when a restore pads the segment. Known limit: after an instance crash, WAL the receiver got just before the crash (a record
only partly flushed) can be overwritten by crash recovery; an older, longer partial of that
segment then shadows the new run's shorter ones until they grow past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from storage.backend import Backend
from storage.errors import StorageError
from storage.osuser import clean_env
from storage.wal import WalConflict, WalStore, parse_lsn, parse_segment_name

from . import dbroles
from .postgres import ChildProcess, _tail

log = logging.getLogger("pgsni.walship")

SLOT = "pgsni_walship"
APP = "pgsni_walship"
PARTIAL_SUFFIX = ".partial"


def instance_options(keep_wal_mb: int = 4096) -> dict[str, str]:
    """Settings an instance needs while a shipper streams from it: pinned on the command line,
    so neither an imported postgresql.conf nor ALTER SYSTEM turns them off."""
    return {"wal_level": "replica", "max_wal_senders": "4", "max_replication_slots": "4",
            "max_slot_wal_keep_size": f"{keep_wal_mb}MB"}


def forget_slot(pgdata: Path) -> None:
    """Drop the shipper's slot from a stopped data directory (Postgres reads pg_replslot/ at
    start; a base backup leaves it out the same way)."""
    shutil.rmtree(pgdata / "pg_replslot" / SLOT, ignore_errors=True)


def remove_spool(spool: Path) -> None:
    """Remove a spool and what its shipper keeps beside it: the backlogs of earlier runs
    (`<spool>.backlog-*`) and the receiver's log (`<spool>.log`, `<spool>.log.1`)."""
    shutil.rmtree(spool, ignore_errors=True)
    for path in spool.parent.glob(f"{spool.name}.*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def replication_conninfo(socket_dir: Path) -> str:
    return make_conninfo(host=str(socket_dir), user=dbroles.ADMIN, application_name=APP,
                         connect_timeout=dbroles.CONNECT_TIMEOUT)


class WalShipper:
    """Ships one instance's WAL to `backend` under database `db_id` (see the module doc)."""

    def __init__(self, backend: Backend, db_id: str, bindir: Path, socket_dir: Path, spool: Path, *,
                 rpo_seconds: float = 1.0, spool_budget: int = 1 << 30, base: str | None = None) -> None:
        """`base`: the stored version the instance's copy descends from (storage/wal.py)."""
        self.backend, self.db_id, self.bindir, self.base = backend, db_id, bindir, base
        self.socket_dir, self.spool = socket_dir, spool
        self.rpo_seconds, self.spool_budget = rpo_seconds, spool_budget
        self.partial_every = rpo_seconds / 2  # a commit waits at most this, plus one upload
        self.poll = min(0.2, rpo_seconds / 4)
        self.store: WalStore | None = None
        self.stored: tuple[int, int] | None = None  # (timeline, LSN) storage holds up to
        self.flushed: int | None = None  # the instance's flushed WAL, when last asked
        self.confirmed: int | None = None  # what the receiver confirmed to it
        self.upload_errors = 0  # failed rounds in all
        self._failing = 0  # in a row: the retry backs off
        self.last_error: str | None = None
        self.failed: WalConflict | None = None  # fatal: someone else writes this history
        self.paused = False  # receiver stopped for the spool budget
        self._receiver: ChildProcess | None = None
        self._receiver_starts = 0
        self._receiver_since = 0.0
        self._next_receiver = 0.0
        self._backlogs: list[Path] = []  # spools of earlier runs, uploaded first
        self._partials: dict[Path, str] = {}  # spool dir -> key of the partial it last stored
        self._partial_at = 0.0
        self._asked_at = 0.0
        self._caught_up_at = time.monotonic()
        self._retry_at = 0.0
        self._conn: psycopg.AsyncConnection | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

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
        """How long storage has been behind the instance's flushed WAL (0: caught up when
        last asked)."""
        lag = self.lag_bytes
        return 0.0 if not lag else time.monotonic() - self._caught_up_at

    @property
    def log_path(self) -> Path:
        return self.spool.with_name(self.spool.name + ".log")

    # --- start and stop --------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the instance, make the slot, take over what an earlier run left in the spool,
        start the receiver and the upload loop. Raises if the instance cannot stream."""
        await asyncio.to_thread(self._prepare_spool)
        try:
            await self._begin()
        except BaseException:
            await self._close_conn()
            raise
        self._start_receiver()
        self._tasks = [asyncio.create_task(self._upload_loop(), name=f"walship-{self.db_id}"),
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
        self.store = WalStore(self.backend, self.db_id, segment_size=int(segment_size), base=self.base)
        try:
            self.stored = await self.store.newest()
        except StorageError as e:
            self._failed_round(e)

    async def stop(self, timeout: float = 30.0) -> bool:
        """Take in what the instance has flushed (if it still runs), stop the receiver, and
        upload what is left, trying until `timeout` or until storage fails. True if the spool
        is empty: storage then holds all the WAL received. What is left stays in the spool for
        the next run."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drain(min(5.0, timeout / 3))
        await self._stop_receiver()
        done, failures = False, self.upload_errors
        while self.failed is None and not done and time.monotonic() < deadline:
            try:
                done = await asyncio.wait_for(self._round(final=True), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if not done and self.upload_errors > failures:
                break  # storage fails: the spool keeps the rest for the next run
            if not done:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        await self._close_conn()
        return done

    def _prepare_spool(self) -> None:
        """The spool of an earlier run (the gateway died, or storage was down at its stop) is
        renamed to a backlog and uploaded before anything new: the new receiver starts from
        the slot, not from files that may belong to another history."""
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        if self.spool.exists() and any(self.spool.iterdir()):
            self.spool.rename(self.spool.with_name(f"{self.spool.name}.backlog-{time.time_ns()}"))
        self._backlogs = sorted(self.spool.parent.glob(f"{self.spool.name}.backlog-*"))
        self.spool.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.spool, 0o700)

    # --- the loop --------------------------------------------------------------------------------
    async def _upload_loop(self) -> None:
        while self.failed is None:
            try:
                if time.monotonic() >= self._retry_at:
                    await self._round(final=False)
            except Exception as e:  # noqa: BLE001 -- a bug must not end shipping for good
                log.exception("WAL shipping of %s failed a round", self.db_id)
                self._failed_round(e)
            partial_in = self._partial_at + self.partial_every - time.monotonic()
            await asyncio.sleep(max(0.01, min(self.poll, partial_in)))

    async def _watch(self) -> None:
        """The receiver, the spool budget and the instance's position, on their own beat: an
        upload that hangs on storage for its whole retry budget does not hold them up."""
        while self.failed is None:
            try:
                await asyncio.to_thread(self._budget)
                self._keep_receiving()
                if time.monotonic() - self._asked_at >= self.partial_every:
                    await self._ask_position()  # lag keeps growing while storage is down
            except Exception:  # noqa: BLE001
                log.exception("watching the WAL receiver of %s failed", self.db_id)
            await asyncio.sleep(self.poll)

    async def _round(self, *, final: bool) -> bool:
        """One pass: backlogs, then the live spool. True if nothing is left to upload."""
        now = time.monotonic()
        partial_due = final or now - self._partial_at >= self.partial_every
        try:
            for backlog in list(self._backlogs):
                if await self._ship(backlog, with_partial=True):
                    await asyncio.to_thread(shutil.rmtree, backlog, True)
                    self._backlogs.remove(backlog)
            if partial_due:
                self._partial_at = now
                await self._ask_position()  # before the partial is read: it holds at least this
            empty = await self._ship(self.spool, with_partial=partial_due)
            self._failing = 0
        except WalConflict as e:
            self.failed = e
            log.error("WAL shipping of %s stopped: %s", self.db_id, e)
            await self._stop_receiver()
            return False
        except (StorageError, OSError) as e:
            self._failed_round(e)
            return False
        return empty and not self._backlogs

    def _failed_round(self, e: Exception) -> None:
        self.upload_errors += 1
        self._failing += 1
        self.last_error = str(e)
        self._retry_at = time.monotonic() + min(10.0, 0.5 * 2 ** min(self._failing, 5))
        log.warning("WAL of %s not uploaded (lag %s bytes): %s", self.db_id, self.lag_bytes, e)

    async def _ship(self, spool: Path, *, with_partial: bool) -> bool:
        """Upload histories and completed segments in order, deleting each once stored, then
        (if asked) the written part of the partial segment. True if nothing is left."""
        assert self.store is not None
        histories, segments, partial = await asyncio.to_thread(self._scan, spool)
        for path in histories:
            await self.store.put_history(path.name, await asyncio.to_thread(path.read_bytes))
            await asyncio.to_thread(path.unlink)
        for (tli, segno), path in segments:
            await self.store.put_segment(path.name, await asyncio.to_thread(path.read_bytes))
            self._advance(tli, (segno + 1) * self.store.segment_size)
            await asyncio.to_thread(path.unlink)
            await self._forget_partial(spool)
        if partial is None or not with_partial:
            return partial is None
        (tli, segno), path = partial
        start = segno * self.store.segment_size
        confirmed = self.confirmed if spool == self.spool else None
        at_least = confirmed - start if confirmed is not None and confirmed >= start else 0
        try:
            data = await asyncio.to_thread(_written_part, path, min(at_least, self.store.segment_size))
        except FileNotFoundError:
            return False  # completed and renamed meanwhile: the next round ships it whole
        end = start + len(data)
        if data and (tli, end) > (self.stored or (0, 0)):
            key = await self.store.put_partial(path.name[:-len(PARTIAL_SUFFIX)], data)
            self._advance(tli, end)
            await self._forget_partial(spool)
            self._partials[spool] = key
        if spool != self.spool or self._stopping:  # nobody writes it any more
            await asyncio.to_thread(path.unlink)
            self._partials.pop(spool, None)
            return True
        return False

    def _scan(self, spool: Path):
        """(history files, [(segment id, path)] in order, (segment id, path) of the partial)."""
        assert self.store is not None
        histories, segments, partials = [], [], []
        for path in spool.iterdir():
            name = path.name
            if name.endswith(".history"):
                histories.append(path)
            elif seg := parse_segment_name(name, self.store.segment_size):
                segments.append((seg, path))
            elif name.endswith(PARTIAL_SUFFIX) and (
                    seg := parse_segment_name(name[:-len(PARTIAL_SUFFIX)], self.store.segment_size)):
                partials.append((seg, path))
        return sorted(histories), sorted(segments), max(partials, default=None)

    def _advance(self, tli: int, lsn: int) -> None:
        if self.stored is None or (tli, lsn) > self.stored:
            self.stored = (tli, lsn)

    async def _forget_partial(self, spool: Path) -> None:
        """Delete the partial this spool stored last (superseded now); best effort, retention
        and `WalStore.remove_superseded` catch what is left."""
        key = self._partials.pop(spool, None)
        if key is not None:
            try:
                await self.backend.delete([key])
            except StorageError as e:
                log.info("could not delete superseded WAL %s: %s", key, e)

    # --- the receiver ----------------------------------------------------------------------------
    def _start_receiver(self) -> None:
        if self.log_path.exists() and self.log_path.stat().st_size > 10 << 20:
            self.log_path.replace(self.log_path.with_suffix(".log.1"))
        argv = [str(self.bindir / "pg_receivewal"), "-D", str(self.spool),
                "-d", replication_conninfo(self.socket_dir), "--slot", SLOT, "--no-loop",
                "--synchronous", "--no-password", "--verbose"]
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with open(fd, "ab") as logf:
            self._receiver = ChildProcess(subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=clean_env(), start_new_session=True))
        self._receiver_starts += 1
        self._receiver_since = time.monotonic()

    def _keep_receiving(self) -> None:
        """Restart a receiver that exited (the instance restarted its walsender, a network
        hiccup on the socket), backing off while it keeps failing."""
        proc = self._receiver
        if self._stopping or (proc is not None and proc.returncode is None):
            return
        if proc is not None:
            self._receiver = None
            if not self.paused:
                self.last_error = f"pg_receivewal exited with {proc.returncode}: {_tail(self.log_path, 2)}"
                log.warning("WAL receiver of %s: %s", self.db_id, self.last_error)
            if time.monotonic() - self._receiver_since > 30:
                self._receiver_starts = 0  # it had been running well: restart at once
            self._next_receiver = time.monotonic() + min(10.0, 0.5 * self._receiver_starts)
        if not self.paused and time.monotonic() >= self._next_receiver:
            self._start_receiver()

    async def _stop_receiver(self) -> None:
        proc, self._receiver = self._receiver, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), wait)
                return

    async def _drain(self, timeout: float) -> None:
        """Let the receiver take in all the instance has flushed (or, if the instance is
        gone, until the receiver exits on its own) before it is stopped."""
        proc = self._receiver
        if proc is None or self.store is None:
            return
        await self._ask_position()
        target, deadline = self.flushed, time.monotonic() + timeout
        while proc.returncode is None and time.monotonic() < deadline:
            if target is not None and (self.confirmed or 0) >= target:
                return
            await asyncio.sleep(0.02)
            await self._ask_position()

    def spooled_bytes(self) -> int:
        total = 0
        for d in (self.spool, *self._backlogs):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(d):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def _budget(self) -> None:
        """Pause the receiver while the spool is over budget (a thread: it stats files)."""
        spooled = self.spooled_bytes()
        if not self.paused and spooled > self.spool_budget:
            self.paused = True
            log.error("WAL spool of %s holds %d bytes, over its budget of %d: receiver paused, "
                      "Postgres keeps the WAL until storage takes it", self.db_id, spooled, self.spool_budget)
            proc = self._receiver
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # _keep_receiving reaps it, and starts none
        elif self.paused and spooled <= self.spool_budget // 2:
            self.paused = False
            log.info("WAL spool of %s drained: receiver resumed", self.db_id)

    # --- the instance's position -----------------------------------------------------------------
    async def _connect(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await dbroles.connect(self.socket_dir, app=APP)
        return self._conn

    async def _ask_position(self) -> None:
        self._asked_at = time.monotonic()
        try:
            conn = await self._connect()
            row = await (await conn.execute(
                # the newest walsender's: one that is going away may have confirmed more
                # than a receiver that has just started has written again
                "SELECT pg_current_wal_flush_lsn()::text, (SELECT flush_lsn::text FROM "
                "pg_stat_replication WHERE application_name = %s ORDER BY backend_start DESC "
                "LIMIT 1)", (APP,))).fetchone()
            self.flushed = parse_lsn(row[0])
            self.confirmed = parse_lsn(row[1]) if row[1] else None
            if (self.stored_lsn or 0) >= self.flushed:
                self._caught_up_at = time.monotonic()
        except (psycopg.Error, OSError):
            await self._close_conn()  # the instance is stopping, or restarting: ask again later

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def _written_part(path: Path, at_least: int = 0) -> bytes:
    """A partial segment's content without the zeros pg_receivewal created it with, but at
    least `at_least` bytes (confirmed written: zeros there are WAL)."""
    with open(path, "rb") as f:
        data = f.read()
    stripped = data.rstrip(b"\0")
    return stripped if len(stripped) >= at_least else data[:at_least]
