"""The gateway's WAL receiver: one physical replication connection to an instance, over its
private socket, as the admin role by peer authentication (pg_hba.conf: `local replication
pgsni_admin peer`, no other replication line). It writes the WAL it receives into the
shipper's spool and tells the instance how far it got. The codec is gateway/wire/replication.py.

Spool files. The WAL of segment `<segment>` (Postgres' file name) received from offset O of
that segment on is the file `<segment>.<OOOOOOOO>.part` (file offset 0 = segment offset O)
while it is written; once the segment's last byte is in it, it is fsynced and renamed to
`<segment>.<OOOOOOOO>.full`, and when the stream ends before that, to `.done`. Only the
receiver renames (a `.part` file is never deleted under it); a new stream always starts a new
file. The `.part` files an earlier process left are closed (`close_leftovers`) when a shipper
starts, before it reads the spool.
A history file the instance's timeline has is fetched (TIMELINE_HISTORY) into
`<TTTTTTTT>.history`. `written` is where the WAL written to the spool ends.

What is fsynced. A spool file is fsynced when it is closed (before its rename), not after every
batch: the instance is told flushed only what storage holds (below), so the slot keeps in
Postgres every byte a power loss could take from the spool, and a new stream fetches it
again. Only while the shipper acknowledges from the spool (`fsync_batches()`: durability=sync
fallen back to async) is every batch fsynced before it is reported. A `.part` file left by a
process that died (`close_leftovers`) is fsynced and closed if the machine has not restarted
since (its bytes are in the page cache); after a restart (another boot id) its unsynced tail
may be garbage, so it is deleted and streamed again.

What the receiver reports as flushed is not its own: `flushed()` (the shipper's) says it, so
in durability=sync the instance hears "flushed" only for WAL storage holds, and a commit
waiting for its synchronous standby (this receiver, by its application_name) returns then.
The slot moves with the reported flush: Postgres keeps every segment from there on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from gateway.wire import replication as repl
from gateway.wire.protocol import (
    NEED_DATA, PROTOCOL_3_0, Authentication, ErrorResponse, Message, MessageReader, ReadyForQuery,
    StartupMessage, decode_backend)
from storage.errors import StorageError
from storage.wal import format_lsn, history_name, parse_lsn, segment_name

from . import dbroles
from .postgres import SOCKET_NAME

log = logging.getLogger("pgsni.walreceiver")

APP = "pgsni_walship"  # the instance's synchronous_standby_names names this
SLOT = "pgsni_walship"
STATUS_EVERY = 1.0  # seconds between status updates when nothing else prompts one
INLINE_BYTES = 64 << 10  # a batch up to this size is written without a worker thread
GATHER_BYTES = 64 << 10  # WAL let gather between batches at most, at the rate seen (_gather)
MIN_LINGER = 0.002  # seconds: a shorter wait than this is not worth a pause


class ReceiverError(StorageError):
    """The replication connection failed or the instance refused it."""


KINDS = ("part", "done", "full")  # being written; closed before the segment's end; complete


def part_name(timeline: int, segno: int, segment_size: int, offset: int, kind: str = "part") -> str:
    return f"{segment_name(timeline, segno, segment_size)}.{offset:08X}.{kind}"


def parse_part_name(name: str) -> tuple[str, int, str] | None:
    """(segment name, offset, kind) of a spool file of WAL, or None."""
    parts = name.split(".")
    if len(parts) != 3 or parts[2] not in KINDS or len(parts[0]) != 24 or len(parts[1]) != 8:
        return None
    try:
        return parts[0], int(parts[1], 16), parts[2]
    except ValueError:
        return None


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
BOOT_MARK = ".boot_id"  # in a spool: the boot its files were written in


def gather_seconds(size: int, elapsed: float, most: float) -> float:
    """How long the receiver lets WAL gather before its next batch, the last one having
    brought `size` bytes over `elapsed` seconds: the time GATHER_BYTES take at that rate, at
    most `most` (0: never linger), and 0 where that is under MIN_LINGER."""
    if most <= 0 or size <= 0:
        return 0.0
    seconds = min(most, GATHER_BYTES * max(elapsed, 0.0) / size)
    return seconds if seconds >= MIN_LINGER else 0.0


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""  # not Linux: every restart counts as the same boot


def close_leftovers(spool: Path, *, current: bool = True) -> None:
    """Close the `.part` files an earlier receiver left (its process died): fsynced and marked
    closed, or deleted if the machine restarted since they were written (see the module doc).
    `current`: the spool of the version the instance runs on, whose WAL it streams again."""
    boot, mark = _boot_id(), spool / BOOT_MARK
    try:
        rebooted = mark.read_text().strip() != boot
    except FileNotFoundError:
        rebooted = False  # nothing was written under a mark yet
    for path in spool.glob("*.part"):
        if not parse_part_name(path.name):
            continue
        if rebooted:
            log.warning("%s was written before the machine restarted: deleted (%s)", path,
                        "the instance streams it again; it was never reported flushed" if current else
                        "WAL of a version the database has moved on from: not in storage, so a "
                        "restore to a point in it stops before it")
            path.unlink()
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(path, path.with_suffix(".done"))
    if rebooted or not mark.exists():
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, (boot + "\n").encode(), 0)
        finally:
            os.close(fd)
    _fsync_dir(spool)


class WalReceiver:
    """Streams an instance's WAL into `spool` from `start` (see the module doc)."""

    def __init__(self, socket_dir: Path, spool: Path, segment_size: int, *,
                 flushed: Callable[[int, int], int], on_written: Callable[[int], None] = lambda _: None,
                 fsync_batches: Callable[[], bool] = lambda: False,
                 linger: Callable[[], float] = lambda: 0.0,
                 files_lock: threading.RLock | None = None) -> None:
        """`flushed(written, synced)`: what to report as flushed, given where the spool's WAL
        ends and how far it is fsynced;
        `on_written(written)`: called when more is written; `fsync_batches()`: whether each
        batch is fsynced before it is reported (the spool acknowledges commits); `linger()`:
        the longest the receiver may let WAL gather between batches (`_gather`; 0 while a
        commit may wait for the receiver); `files_lock`:
        held while a spool file is written or closed (the shipper's, which closes leftovers
        under it)."""
        self.socket_path = socket_dir / SOCKET_NAME
        self.spool, self.segment_size, self._flushed = spool, segment_size, flushed
        self._on_written, self._fsync_batches, self._linger = on_written, fsync_batches, linger
        self.timeline: int | None = None
        self.written: int | None = None  # where the WAL in the spool ends
        self.synced: int | None = None  # how far it is fsynced
        self._pos: int | None = None  # where the WAL written to files ends (the write thread's)
        self.server_flush: int | None = None  # the instance's WAL end, as it last said
        self.batches = 0  # batches of WAL taken (each a wake-up, a write and a status check)
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._messages = MessageReader(startup=False, max_length=4 << 20)
        self._fd: int | None = None
        # a write's worker thread may outlive its cancelled await: closing waits for it
        self._files_lock = files_lock or threading.RLock()
        self._file: tuple[int, int, Path] | None = None  # (segno, offset in segment, path)
        self._reported: tuple[int, int] | None = None

    # --- connecting ------------------------------------------------------------------------------
    async def connect(self, timeout: float = dbroles.CONNECT_TIMEOUT) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ReceiverError(f"cannot open a replication connection on {self.socket_path}: {e}") from e
        self._writer.write(StartupMessage(PROTOCOL_3_0 >> 16, 0, {
            "user": dbroles.ADMIN, "replication": "true", "application_name": APP}).encode())
        while True:
            event = decode_backend(await self._next())
            if isinstance(event, Authentication) and event.code != 0:
                raise ReceiverError(f"the instance asked for authentication {event.code} on its "
                                    f"replication connection (expected peer)")
            if isinstance(event, ErrorResponse):
                raise ReceiverError(f"replication connection refused: {event.message} ({event.code})")
            if isinstance(event, ReadyForQuery):
                return

    async def identify(self) -> tuple[int, int]:
        """(timeline, flushed WAL end) of the instance (IDENTIFY_SYSTEM)."""
        rows = await self._command("IDENTIFY_SYSTEM")
        timeline, end = int(rows[0][1]), parse_lsn(rows[0][2].decode())
        self.timeline, self.server_flush = timeline, end
        return timeline, end

    async def fetch_history(self, timeline: int) -> None:
        """Write timeline `timeline`'s history file into the spool (timeline 1 has none)."""
        if timeline <= 1:
            return
        rows = await self._command(f"TIMELINE_HISTORY {timeline}")
        name, content = rows[0][0].decode(), rows[0][1] or b""
        if name != history_name(timeline):
            raise ReceiverError(f"unexpected timeline history file name {name!r}")
        await asyncio.to_thread(self._write_whole, self.spool / name, content)

    # --- streaming -------------------------------------------------------------------------------
    async def stream(self, start: int) -> None:
        """Receive from `start` (on the timeline `identify` saw) until the instance ends the
        stream (it stopped, or its timeline ended) or the connection fails."""
        assert self.timeline is not None
        await self._send(repl.query(f"START_REPLICATION SLOT {SLOT} PHYSICAL {format_lsn(start)} "
                                    f"TIMELINE {self.timeline}"))
        msg = await self._next()
        if msg.type != b"W":
            raise self._refused(msg, "START_REPLICATION")
        self.written = self.synced = self._pos = start
        try:
            await self._copy_both()
        finally:
            await asyncio.to_thread(self._close_file, True)

    async def _copy_both(self) -> None:
        loop = asyncio.get_running_loop()
        last_status = 0.0
        ended = False
        taken = loop.time()  # when the last batch was taken
        while not ended:
            batch, reply, ended = await self._batch()
            if batch:
                self.batches += 1
                if not self._write_inline(batch):
                    await asyncio.to_thread(self._write_batch, batch)
                self.written = batch[-1].end
                self._on_written(self.written)
            if reply or loop.time() - last_status >= STATUS_EVERY:
                self.report(force=True)
                last_status = loop.time()
            elif batch:
                self.report()  # only if what counts as flushed moved
            if batch and not ended:
                now = loop.time()
                await self._gather(_size(batch), now - taken)
                taken = now

    async def _gather(self, size: int, elapsed: float) -> None:
        """Let WAL gather before the next batch is taken (`gather_seconds`, after a batch of
        `size` bytes that came over `elapsed` seconds). Under a steady write load the instance
        sends WAL after every commit; taking each message as it comes costs this process a
        wake-up, a parse, a write and a status check per commit, on the core the relay needs.
        Where no commit waits for the receiver (durability=async, shipped every rpo_seconds / 2),
        the connection is not read for a moment and one batch takes many commits. The
        instance's socket buffer holds what comes meanwhile: lingering lets at most
        GATHER_BYTES arrive at the rate seen, well under what the buffer holds, so the
        instance does not wait to send; a bulk load, whose WAL comes faster than lingering
        would pay for, is taken as it comes."""
        seconds = gather_seconds(size, elapsed, self._linger())
        if not seconds or self._writer is None:  # closed meanwhile: the next read ends the stream
            return
        transport = self._writer.transport
        transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            if not transport.is_closing():
                transport.resume_reading()

    async def _batch(self) -> tuple[list[repl.XLogData], bool, bool]:
        """The WAL messages available now (waiting up to STATUS_EVERY for the first), whether
        the instance asked for a reply, and whether it ended the stream."""
        batch: list[repl.XLogData] = []
        reply = False
        try:
            async with asyncio.timeout(STATUS_EVERY):  # no task per wake-up, as wait_for makes
                msg = await self._next()
        except TimeoutError:
            return batch, False, False
        while True:
            if msg.type == b"d":
                event = repl.decode_copy_data(msg.body)
                if isinstance(event, repl.XLogData):
                    if event.start != (batch[-1].end if batch else self.written):
                        raise ReceiverError(f"WAL arrived from {format_lsn(event.start)}, expected "
                                            f"{format_lsn(batch[-1].end if batch else self.written)}")
                    if event.data:
                        batch.append(event)
                    self.server_flush = max(self.server_flush or 0, event.wal_end)
                else:
                    reply = reply or event.reply_requested
                    self.server_flush = max(self.server_flush or 0, event.wal_end)
            elif msg.type == b"C":  # the stream's end as a stopping instance sends it ("COPY 0")
                return batch, reply, True
            elif msg.type == b"c":  # the instance ends the stream: its timeline ended, or it stops
                with contextlib.suppress(OSError, RuntimeError):
                    await self._send(repl.copy_done())
                return batch, reply, True
            elif msg.type == b"E":
                raise self._refused(msg, "streaming")
            nxt = self._buffered()
            if nxt is None or _size(batch) >= 8 << 20:
                return batch, reply, False
            msg = nxt

    def report(self, *, force: bool = False) -> None:
        """Tell the instance how far storage (flushed) got, if that changed, and how far the
        spool got (written); `force`: even if flushed did not move (it asked, or time for a
        periodic update). Where the spool ends alone is not worth a message per commit: no
        commit waits for it (durability=sync waits for flushed)."""
        if self._writer is None or self.written is None:
            return
        status = (self.written, self._flushed(self.written, self.synced))
        if force or self._reported is None or status[1] != self._reported[1]:
            self._reported = status
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(repl.status_update(*status))

    # --- spool files -----------------------------------------------------------------------------
    @property
    def current_file(self) -> Path | None:
        """The spool file being written (its size may include bytes not fsynced yet)."""
        return self._file[2] if self._file is not None else None

    def _write_inline(self, batch: list[repl.XLogData]) -> bool:
        """Write a small batch on the loop's own thread, sparing a thread hop per commit: only
        into the file already open (no file to open, close or fsync: a write to the page
        cache, microseconds), and only if no other thread holds the spool's files now."""
        if self._fsync_batches() or _size(batch) > INLINE_BYTES:
            return False
        if not self._files_lock.acquire(blocking=False):
            return False
        try:
            if self._file is None:
                return False
            segno = self._file[0]
            if not segno * self.segment_size <= batch[0].start <= batch[-1].end < (segno + 1) * self.segment_size:
                return False
            self._write_locked(batch)
            return True
        finally:
            self._files_lock.release()

    def _write_batch(self, batch: list[repl.XLogData]) -> None:
        with self._files_lock:
            self._write_locked(batch)

    def _write_locked(self, batch: list[repl.XLogData]) -> None:
        for event in batch:
            pos, data = event.start, event.data
            while data:
                segno, offset = divmod(pos, self.segment_size)
                take = min(len(data), self.segment_size - offset)
                fd = self._open(segno, offset)
                _write_all(fd, data[:take], offset - self._file[1])
                pos, data = pos + take, data[take:]
                self._pos = pos
                if offset + take == self.segment_size:
                    self._close_file(True)
        if self._fsync_batches():
            self._sync_locked()

    async def sync_spool(self) -> None:
        """fsync what the spool file being written holds (before it is reported flushed)."""
        await asyncio.to_thread(self._sync_locked)

    def _sync_locked(self) -> None:
        with self._files_lock:
            if self._fd is not None:
                os.fsync(self._fd)
            self.synced = self._pos  # the files before this one were fsynced as they closed

    def _open(self, segno: int, offset: int) -> int:
        if self._file is not None and self._file[0] == segno:
            return self._fd
        self._close_file(True)
        path = self.spool / part_name(self.timeline, segno, self.segment_size, offset)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = (segno, offset, path)
        return self._fd

    def _close_file(self, sync: bool) -> None:
        with self._files_lock:
            self._close_locked(sync)

    def _close_locked(self, sync: bool) -> None:
        fd, file = self._fd, self._file
        self._fd, self._file = None, None
        if fd is None:
            return
        try:
            if sync:
                os.fsync(fd)
                self.synced = self._pos
            full = os.fstat(fd).st_size + file[1] == self.segment_size
        finally:
            os.close(fd)
        segno, offset, path = file
        kind = "full" if full else "done"
        os.replace(path, path.with_name(part_name(self.timeline, segno, self.segment_size, offset, kind)))
        _fsync_dir(self.spool)

    def _write_whole(self, path: Path, content: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.spool)

    # --- the connection --------------------------------------------------------------------------
    async def _command(self, sql: str) -> list[list[bytes | None]]:
        await self._send(repl.query(sql))
        rows, error = [], None
        while True:
            msg = await self._next()
            if msg.type == b"D":
                rows.append(repl.data_row(msg))
            elif msg.type == b"E":
                error = self._refused(msg, sql.split()[0])
            elif msg.type == b"Z":
                if error is not None:
                    raise error
                if not rows:
                    raise ReceiverError(f"{sql.split()[0]} returned no row")
                return rows

    def _refused(self, msg: Message, what: str) -> ReceiverError:
        if msg.type in (b"E", b"N"):
            event = decode_backend(msg)
            if isinstance(event, ErrorResponse):
                return ReceiverError(f"{what} refused by the instance: {event.message} ({event.code})")
        return ReceiverError(f"{what}: unexpected message {msg.type!r} from the instance")

    async def _send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    def _buffered(self) -> Message | None:
        event = self._messages.next_event()
        return None if event is NEED_DATA else event

    async def _next(self) -> Message:
        assert self._reader is not None
        while True:
            event = self._messages.next_event()
            if event is not NEED_DATA:
                return event
            data = await self._reader.read(1 << 20)
            if not data:
                raise ReceiverError("the instance closed the replication connection")
            self._messages.receive_data(data)

    async def close(self) -> None:
        """Close the connection (a stream then ends with an error, closing its file)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _size(batch: list[repl.XLogData]) -> int:
    """The WAL bytes of a batch: its messages are contiguous (`_batch` checks it), so no sum."""
    return batch[-1].end - batch[0].start if batch else 0


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite until every byte is written (a short write on a nearly full disk is not an end)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
