"""Per-database leases in storage, so two gateways sharing a bucket never run one database at
the same time (each would write its own diverging copy).

Two kinds of small objects:
- `dbs/<id>/lease.json` names the gateway that holds the database (`{"holder": ...}`); it is
  absent (or names no holder) when free. It is taken only by conditional writes, so two
  gateways racing for a free lease cannot both win. Its holder deletes it once the database
  has stopped and its changes are saved: at once, in the background (`release_later`); a
  failed release is retried in `keep_alive`, and `release_idle` gives up all that are left.
  So is a lease a failed claim may have taken (the store took the write, the answer was lost).
- `gateways/<holder>.json` is that gateway's heartbeat (`{"holder", "expires": <unix time>,
  "ttl"}`, and the address and load of a gateway with links to the others: storage/heartbeats.py).
  A gateway renews its one heartbeat every `ttl/3` while it holds any lease (always, when it
  publishes an address), not one write per database.

The holder fences itself. It counts its heartbeat valid for `ttl - margin` from the moment it
began its last successful write (`valid()`). Every heartbeat write is bounded by `beat_timeout`
(margin / 2), and `next_round` also falls due when validity ends, so within margin / 2 of that
moment it calls `on_expired` (stop the instances: when it returns, nothing of the lapsed
databases may run, start or save any more, for their leases are given up right after);
`fencing_needed()` says so at once, without storage. From then on its holdings are void
(`lapsed`): a renewal once storage is back does not bring them back, the next claim asks
storage again and may find another gateway holding the database.

Another gateway takes a lease over only when the holder's heartbeat has expired, plus the
margin, by two clocks: its own against the `expires` the holder wrote (a cheap first test),
then the store's: the heartbeat's `modified` (when the store took it, never before the holder
began the write) plus the holder's ttl, the margin and 1 s (S3 stamps whole seconds), against
the `modified` of a heartbeat the claimant writes just then. So the holder has begun fencing at
least 1.5 x margin before a takeover, and skew between the gateways' clocks does not count: a
clock behind only delays takeovers. What must hold is that the store stamps by one clock (S3
does) and that clocks run at the same rate over a ttl. A request the store takes after its
caller gave up on it does no harm: every lease write is conditional on the lease read. On s3fs `modified` is the writing machine's clock (s3fs keeps mtimes
in object metadata): there the gateways' clocks must agree to well within 1.5 x margin (15 s at
the default 60 s ttl), as NTP keeps them.

`check_timing` (called at gateway start) refuses a ttl too short for the storage's retry
budget: a claim renews the heartbeat and must finish while it is valid (a claim that finishes
later is refused). A gateway keeps its holder name across restarts (it is stored in the data
root), so a restarted gateway reopens its own databases at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Awaitable, Callable, Iterable, Protocol

from .backend import Backend
from .errors import NotFound, PreconditionFailed, StorageError, StorageUnavailable
from .heartbeats import Heartbeat, beat_key as _beat_key

log = logging.getLogger("pgsni.leases")

STAMP_RESOLUTION = 1.0  # S3's Last-Modified is in whole seconds
MAX_MARGIN = 10.0  # the default margin is a sixth of the ttl, at most this


class LeaseTimingError(StorageError, ValueError):
    """Lease timings that cannot work with this storage (refused at start-up)."""


def default_margin(ttl: float) -> float:
    """The margin of a ttl when none is given: a sixth of it, at most MAX_MARGIN."""
    return min(MAX_MARGIN, ttl / 6)


def heartbeat_timeout(margin: float) -> float:
    """How long one heartbeat write may take: well inside the margin, so that a holder whose
    store hangs notices its lapse and fences in time."""
    return margin / 2


def check_timing(ttl: float, margin: float, storage_retry_budget: float) -> None:
    """LeaseTimingError (a ValueError) unless a claim can finish while the heartbeat it
    renewed is valid: the renewal (at most `heartbeat_timeout(margin)`) plus one storage
    request that needs its whole retry budget must take less than `ttl - margin`. Otherwise
    every claim on a slow store would be refused."""
    if ttl <= 0:
        return  # no leases
    if ttl <= heartbeat_timeout(margin) + storage_retry_budget + margin:
        enough = storage_retry_budget + 1.5 * max(margin, MAX_MARGIN)
        raise LeaseTimingError(
            f"lease_seconds = {ttl:g} is too short for this storage: one request may take "
            f"{storage_retry_budget:.1f} s with all its retries (storage_attempts x "
            f"storage_timeout + backoff), and a claim must finish within lease_seconds minus "
            f"{margin:g} s (the margin) and {heartbeat_timeout(margin):g} s (a heartbeat); set "
            f"lease_seconds above {enough:.1f}, or lower storage_attempts or storage_timeout")


class LeaseHeld(StorageError):
    """Another live gateway holds the database; `draining`: that gateway is shutting down, so
    it gives the lease up once the database is saved (a claimant may wait for that)."""

    def __init__(self, db_id: str, holder: str, expires: float | None, draining: bool = False) -> None:
        super().__init__(f'database "{db_id}" is open on another gateway ({holder})'
                         + (", which is shutting down" if draining else ""))
        self.db_id, self.holder, self.expires, self.draining = db_id, holder, expires, draining


def _lease_key(db_id: str) -> str:
    return f"dbs/{db_id}/lease.json"


class Marks(Protocol):
    """Where a gateway notes, on its own disk, the leases that may name it (storage/lease_marks.py)."""

    async def add(self, db_id: str) -> None: ...

    async def discard(self, db_id: str) -> None: ...

    def ids(self) -> Iterable[str]: ...


class Leases:
    def __init__(self, backend: Backend, holder: str | Callable[[], str], ttl: float, *,
                 margin: float | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, marks: Marks | None = None) -> None:
        """`holder`: this gateway's name, or a function giving it on first use. `marks`: the
        leases that may name it, kept across restarts (see the module docstring)."""
        self.backend, self._holder, self.ttl, self.marks = backend, holder, ttl, marks
        self.margin = margin if margin is not None else default_margin(ttl)
        self.beat_timeout = heartbeat_timeout(self.margin)
        self.clock, self.monotonic = clock, monotonic
        self.held: set[str] = set()
        self.lapsed: set[str] = set()  # held when the heartbeat lapsed: to be fenced (stopped)
        self._unreleased: set[str] = set()  # let go, not yet given up in storage
        self._releasing: set[asyncio.Task] = set()  # release_later's background releases
        self._locks: dict[str, asyncio.Lock] = {}  # a claim and a release of one id never overlap
        self._drain_waits: dict[str, asyncio.Future] = {}
        self._beat_at: float | None = None  # monotonic start of the last successful heartbeat
        self._fence: asyncio.Future | None = None  # keep_alive's on_expired, while it runs
        self._fencing: set[str] = set()  # the lapsed holdings it stops
        # what this gateway publishes in its heartbeat, for links between gateways: (address,
        # load); set, the heartbeat is renewed even while it holds nothing, so peers find it
        self.advertise: Callable[[], tuple[str, dict[str, int]]] | None = None
        self.advertise_local = ""  # a worker's local channel, published beside its address

    @property
    def holder(self) -> str:
        if callable(self._holder):
            self._holder = self._holder()
        return self._holder

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def valid(self) -> bool:
        """Whether this gateway's heartbeat is surely still alive in others' eyes."""
        return self._valid_for() > 0

    def _valid_for(self) -> float:
        """Seconds until the heartbeat lapses (0: lapsed, or never written)."""
        if self._beat_at is None:
            return 0.0
        return max(0.0, self._beat_at + self.ttl - self.margin - self.monotonic())

    def _lapse_if_expired(self) -> None:
        """Once the heartbeat may have expired in others' eyes, this gateway's holdings are
        void, whatever storage says later: another gateway may have taken them over. They
        are remembered in `lapsed` (their instances must stop) and their leases are given up
        when storage answers again, unless claimed again first."""
        if self.held and not self.valid():
            self.lapsed |= self.held
            self._unreleased |= self.held
            self.held.clear()

    def holds(self, db_id: str) -> bool:
        """Whether this gateway may run or save `db_id` now (always, without leases): it holds
        the lease and its heartbeat has not lapsed since (a renewal after a lapse does not
        bring a holding back). Touches no storage."""
        if not self.enabled:
            return True
        self._lapse_if_expired()
        return db_id in self.held

    def fencing_needed(self) -> bool:
        """Whether this gateway must stop its instances now (its heartbeat lapsed). Touches no
        storage, so it answers at once even while storage hangs."""
        self._lapse_if_expired()
        return bool(self.lapsed)

    def _until_lapse(self) -> float:
        if self.lapsed:
            return 0.0
        return self._valid_for() if self.held else self.ttl

    async def beat(self) -> None:
        """Renew the heartbeat; StorageUnavailable if the store has not taken it within
        `beat_timeout`."""
        self._lapse_if_expired()  # a renewal after a lapse does not bring holdings back
        started = self.monotonic()
        address, load = self.advertise() if self.advertise is not None else ("", {})
        body = Heartbeat(self.holder, self.clock() + self.ttl, self.ttl, address, load,
                         self.advertise_local).encode()
        try:
            await asyncio.wait_for(self.backend.put(_beat_key(self.holder), body), self.beat_timeout)
        except TimeoutError:
            raise StorageUnavailable(f"storage took more than {self.beat_timeout:g} s to take this "
                                     f"gateway's lease heartbeat") from None
        self._beat_at = started

    async def claim(self, db_id: str) -> bool:
        """Hold `db_id` for this gateway; LeaseHeld if another live gateway holds it. False
        when it was held already (answered from memory); True when the lease was taken in
        storage (another gateway may have run the database meanwhile)."""
        if not self.enabled:
            return False
        self._lapse_if_expired()
        if db_id in self.held:  # and so valid()
            return False  # still ours: no storage round trip (and it works while storage is down)
        async with self._lock(db_id):
            if self._beat_at is None or self.monotonic() - self._beat_at > self.ttl / 3:
                await self.beat()
            if self.marks is not None:  # before the write: a crash after it must find the mark
                try:
                    await self.marks.add(db_id)
                except OSError as e:
                    raise StorageError(f"cannot mark the lease of {db_id} on local disk: {e}") from e
            try:
                for _ in range(3):
                    try:
                        await self._try_claim(db_id)
                        break
                    except PreconditionFailed:
                        continue  # the lease changed under us; read it again
                else:
                    raise LeaseHeld(db_id, "unknown (lease contended)", None)
            except LeaseHeld:
                await self._unmark_if_let_go(db_id)  # no write of this claim was taken
                raise
            except BaseException:
                # the store may have taken our write though its answer never came (a timeout, a
                # cancelled claim): given up later, or the lease names this live gateway forever
                self._unreleased.add(db_id)
                raise
            self._unreleased.discard(db_id)
            if not self.valid():  # storage took so long that the heartbeat lapsed meanwhile
                self._unreleased.add(db_id)
                self._lapse_if_expired()
                raise StorageUnavailable(f"the lease of {db_id} was taken only after this "
                                         f"gateway's heartbeat lapsed (storage too slow)")
            self.held.add(db_id)
        return True

    async def holder_of(self, db_id: str) -> str | None:
        """The gateway the lease of `db_id` names in storage now (None: free), alive or not."""
        try:
            data, _ = await self.backend.get(_lease_key(db_id))
        except NotFound:
            return None
        return _holder(data)

    async def drained(self, db_id: str, poll: float = 0.3) -> bool:
        """Whether `db_id` was held by a gateway that drains (it shuts down, saves the database
        and gives it up); if so, returns once that lease is gone. The caller bounds the wait;
        callers for one database share one series of reads. False (at once) on storage errors."""
        if not self.enabled:
            return False
        task = self._drain_waits.get(db_id)
        if task is None or task.done():
            task = asyncio.ensure_future(self._wait_drained(db_id, poll))
            self._drain_waits[db_id] = task
            task.add_done_callback(lambda _: self._drain_waits.pop(db_id, None))
        return await asyncio.shield(task)

    async def _wait_drained(self, db_id: str, poll: float) -> bool:
        waited = False
        try:
            while True:
                holder = await self.holder_of(db_id)
                if holder is None or holder == self.holder:
                    return waited
                try:
                    beat = Heartbeat.decode((await self.backend.get(_beat_key(holder)))[0], self.ttl)
                except (NotFound, ValueError):
                    return waited
                if not beat.draining or self.clock() > beat.expires + self.margin:
                    return waited
                waited = True
                await asyncio.sleep(poll)
        except StorageError as e:
            log.info("waiting for a drain of %s: %s", db_id, e)
            return False

    def _lock(self, db_id: str) -> asyncio.Lock:
        return self._locks.setdefault(db_id, asyncio.Lock())

    async def _try_claim(self, db_id: str) -> None:
        """Write a lease with a fresh token, conditionally on what was read: also over a lease
        naming this gateway (an earlier run's, or one whose release may still be on its way),
        so that no older conditional write of ours can land on it any more."""
        mine = json.dumps({"holder": self.holder, "claim": secrets.token_hex(8)}).encode()
        try:
            data, etag = await self.backend.get(_lease_key(db_id))
        except NotFound:
            await self.backend.put(_lease_key(db_id), mine, if_none_match=True)
            return
        holder = _holder(data)
        if holder is not None and holder != self.holder:
            await self._check_expired(db_id, holder)
        await self.backend.put(_lease_key(db_id), mine, if_match=etag)

    async def _check_expired(self, db_id: str, holder: str) -> None:
        """LeaseHeld unless `holder`'s heartbeat expired, plus the margin. First by this
        gateway's clock against the `expires` the holder wrote (one read answers the common
        case, a live holder); then, before taking over, by the store's clock: when it took
        the holder's heartbeat, plus its ttl, against when it takes one of ours just now."""
        key = _beat_key(holder)
        try:
            beat = Heartbeat.decode((await self.backend.get(key))[0], self.ttl)
            expires, ttl = beat.expires, beat.ttl
        except NotFound:
            beat = None
        except ValueError:
            beat = None  # an unreadable heartbeat is no proof of life
        if beat is not None:
            if self.clock() <= expires + self.margin:
                raise LeaseHeld(db_id, holder, expires, beat.draining)
            theirs = await self.backend.head(key)
            await self.beat()
            ours = await self.backend.head(_beat_key(self.holder))
            if theirs is not None:
                dead_at = theirs.modified + ttl + self.margin + STAMP_RESOLUTION
                if ours is None or ours.modified <= dead_at:
                    raise LeaseHeld(db_id, holder, theirs.modified + ttl)
        log.warning("taking over %s from gateway %s, whose heartbeat %s", db_id, holder,
                    "is missing or unreadable" if beat is None else "expired")

    def release_later(self, db_id: str) -> None:
        """The database stopped and is saved: give its lease up at once, in the background
        (so another gateway may take the database over); keep_alive retries a failed one."""
        if self.enabled and db_id in self.held:
            self.held.discard(db_id)
            self._unreleased.add(db_id)
            task = asyncio.get_running_loop().create_task(self._release(db_id))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    def left_by_earlier_run(self) -> set[str]:
        """The leases an earlier run of this gateway marked and did not give up (they may
        still name it): at start, before any claim."""
        return set(self.marks.ids()) if self.marks is not None else set()

    def give_up_later(self, db_id: str) -> None:
        """Give up `db_id`'s lease in the background (keep_alive) unless claimed before: one an
        earlier run left, whose copy has nothing to save."""
        if self.enabled and db_id not in self.held:
            self._unreleased.add(db_id)

    async def release_idle(self) -> None:
        """Give up every lease let go and not given up yet (at shutdown: all of them), except
        lapsed ones whose instances are not stopped yet."""
        for db_id in list(self._unreleased - self.lapsed):
            await self._release(db_id)

    async def release(self, db_id: str) -> None:
        """Give `db_id` up now (after its last changes are saved). A failed release is retried."""
        if self.enabled and db_id in self.held:
            self.held.discard(db_id)
            self._unreleased.add(db_id)
            await self._release(db_id)

    async def _release(self, db_id: str) -> None:
        """Give up a lease let go, unless claimed again meanwhile; a failure is logged and
        left for the next keep_alive round."""
        async with self._lock(db_id):
            if db_id in self.held or db_id not in self._unreleased:
                return
            try:
                # no other gateway takes over a lease while this gateway's heartbeat is valid,
                # and the write is conditional on the lease read: whenever the store takes it,
                # it frees only that lease, never one claimed since (by anyone)
                if not self.valid():
                    raise StorageUnavailable("this gateway's lease heartbeat is not renewed")
                async with asyncio.timeout(self._valid_for()):
                    for _ in range(3):
                        try:
                            await self._give_up(db_id)
                            break
                        except PreconditionFailed:
                            continue  # it changed under us (a late write of ours): read it again
                    else:
                        raise StorageUnavailable("the lease kept changing under its release")
                self._unreleased.discard(db_id)
            except (StorageError, TimeoutError) as e:
                log.warning("releasing the lease of %s failed (retried later): %s", db_id,
                            str(e) or "not done while the heartbeat was valid")
                return
            await self._unmark_if_let_go(db_id)

    async def _give_up(self, db_id: str) -> None:
        """Free the lease if it names this gateway: a "free" lease written If-Match the one read."""
        try:
            data, etag = await self.backend.get(_lease_key(db_id))
        except NotFound:
            return
        if _holder(data) == self.holder:
            free = json.dumps({"holder": None, "released_by": self.holder}).encode()
            await self.backend.put(_lease_key(db_id), free, if_match=etag)

    async def _unmark_if_let_go(self, db_id: str) -> None:
        """The lease names this gateway no more (given up, or another's): forget its mark."""
        if self.marks is not None and db_id not in self.held and db_id not in self._unreleased:
            try:
                await self.marks.discard(db_id)
            except OSError as e:  # a stale mark costs one more release at the next start
                log.warning("could not remove the lease mark of %s: %s", db_id, e)

    def next_round(self) -> float:
        """Seconds until `keep_alive` is due: every ttl/3, and at the moment the heartbeat
        would lapse (the gateway runs it in a supervised loop)."""
        return max(0.05, min(self.ttl / 3, self._until_lapse()))

    async def keep_alive(self, on_expired: Callable[[], Awaitable[None]]) -> None:
        """One round. Its storage work takes at most `beat_timeout` in all (releases that do not
        fit are left for the next round), so a hanging store cannot delay `on_expired`. Once
        the heartbeat lapsed, `on_expired` runs once, in the background, and each round waits
        for it up to ttl/3 before it goes on renewing: the lapsed leases are given up only
        once it has returned."""
        if not self.enabled or not (self.held or self._unreleased or self.lapsed or self.advertise):
            return
        try:
            await self.beat()
        except StorageError as e:
            log.warning("renewing this gateway's lease heartbeat failed: %s", e)
        if self._fence is None and self.fencing_needed():
            log.error("lease heartbeat not renewed for %.0f s: stopping this gateway's databases "
                      "so another gateway can safely take them over", self.ttl - self.margin)
            self._fencing = set(self.lapsed)
            self._fence = asyncio.ensure_future(on_expired())
            self._fence.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen below
        if self._fence is not None:
            # the fence waits for what must end first (a save in progress, bounded by the
            # storage's timeouts): meanwhile the rounds go on renewing the heartbeat, or what
            # this gateway claimed since would lapse in turn
            done, _ = await asyncio.wait({self._fence}, timeout=self.ttl / 3)
            if not done:
                return
            fence, self._fence = self._fence, None
            fence.result()  # a fence that failed is run again next round: its holdings stay lapsed
            self.lapsed -= self._fencing
        deadline = asyncio.get_running_loop().time() + self.beat_timeout
        try:  # only now: a lapsed lease is given up after its instance has stopped
            async with asyncio.timeout_at(deadline):
                await self.release_idle()
        except TimeoutError:
            log.warning("releasing leases: storage too slow, the rest is retried later")


def _holder(data: bytes) -> str | None:
    try:
        holder = json.loads(data).get("holder")
    except (ValueError, AttributeError):
        return None  # a damaged lease holds nothing
    return holder if isinstance(holder, str) and holder else None
