"""Per-database leases in storage, so two gateways sharing a bucket never run one database at
the same time (each would write its own diverging copy).

Two kinds of small objects:
- `dbs/<id>/lease.json` names the gateway that holds the database (`{"holder": ...}`); it is
  absent (or names no holder) when free. It is taken only by conditional writes, so two
  gateways racing for a free lease cannot both win; its holder deletes it to release it.
- `gateways/<holder>.json` is that gateway's heartbeat (`{"expires": <unix time>}`). A gateway
  renews its one heartbeat every `ttl/3` while it holds any lease, not one write per database.

A lease whose holder's heartbeat expired (plus a margin for clock skew) may be taken over. The
holder fences itself first: once it has gone `ttl - margin` without renewing (storage down,
process frozen), it must stop its instances (`keep_alive_forever`'s `on_expired`), and its
holdings are void from then on (`lapsed`): a renewal once storage is back does not bring them
back, the next claim asks storage again and may find another gateway holding it. A gateway
keeps its holder name across restarts (it is stored in the data root), so a restarted gateway
reopens its own databases at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable

from .backend import Backend
from .errors import NotFound, PreconditionFailed, StorageError, StorageUnavailable

log = logging.getLogger("pgsni.leases")


class LeaseHeld(StorageError):
    """Another live gateway holds the database."""

    def __init__(self, db_id: str, holder: str, expires: float | None) -> None:
        super().__init__(f'database "{db_id}" is open on another gateway ({holder})')
        self.db_id, self.holder, self.expires = db_id, holder, expires


def _lease_key(db_id: str) -> str:
    return f"dbs/{db_id}/lease.json"


def _beat_key(holder: str) -> str:
    return f"gateways/{holder}.json"


class Leases:
    def __init__(self, backend: Backend, holder: str | Callable[[], str], ttl: float, *,
                 margin: float | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """`holder`: this gateway's name, or a function giving it on first use."""
        self.backend, self._holder, self.ttl = backend, holder, ttl
        self.margin = margin if margin is not None else min(10.0, ttl / 6)
        self.clock, self.monotonic = clock, monotonic
        self.held: set[str] = set()
        self.lapsed: set[str] = set()  # held when the heartbeat lapsed: to be fenced (stopped)
        self._unreleased: set[str] = set()  # releases that failed (storage down); retried
        self._idle: dict[str, float] = {}  # held but stopped: monotonic time, released later
        self._beat_at: float | None = None  # monotonic start of the last successful heartbeat

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
        return self._beat_at is not None and self.monotonic() < self._beat_at + self.ttl - self.margin

    def _lapse_if_expired(self) -> None:
        """Once the heartbeat may have expired in others' eyes, this gateway's holdings are
        void, whatever storage says later: another gateway may have taken them over. They
        are remembered in `lapsed` (their instances must stop) and their leases are given up
        when storage answers again, unless claimed again first."""
        if self.held and not self.valid():
            self.lapsed |= self.held
            self._unreleased |= self.held
            for db_id in self.held:
                self._idle.pop(db_id, None)
            self.held.clear()

    def fencing_needed(self) -> bool:
        """Whether this gateway must stop its instances now (its heartbeat lapsed). Touches no
        storage, so it answers at once even while storage hangs."""
        self._lapse_if_expired()
        return bool(self.lapsed)

    async def beat(self) -> None:
        self._lapse_if_expired()  # a renewal after a lapse does not bring holdings back
        started = self.monotonic()
        body = {"holder": self.holder, "expires": self.clock() + self.ttl}
        await self.backend.put(_beat_key(self.holder), json.dumps(body).encode())
        self._beat_at = started

    async def claim(self, db_id: str) -> bool:
        """Hold `db_id` for this gateway; LeaseHeld if another live gateway holds it. False
        when it was held already (answered from memory); True when the lease was taken in
        storage (another gateway may have run the database meanwhile)."""
        if not self.enabled:
            return False
        self._lapse_if_expired()
        if db_id in self.held:  # and so valid()
            self._idle.pop(db_id, None)
            return False  # still ours: no storage round trip (and it works while storage is down)
        if self._beat_at is None or self.monotonic() - self._beat_at > self.ttl / 3:
            await self.beat()
        for _ in range(3):
            try:
                await self._try_claim(db_id)
                break
            except PreconditionFailed:
                continue  # the lease changed under us; read it again
        else:
            raise LeaseHeld(db_id, "unknown (lease contended)", None)
        self._unreleased.discard(db_id)
        if not self.valid():  # storage took so long that the heartbeat lapsed meanwhile
            self._unreleased.add(db_id)
            self._lapse_if_expired()
            raise StorageUnavailable(f"the lease of {db_id} was taken only after this gateway's "
                                     f"heartbeat lapsed (storage too slow)")
        self.held.add(db_id)
        return True

    async def _try_claim(self, db_id: str) -> None:
        mine = json.dumps({"holder": self.holder}).encode()
        try:
            data, etag = await self.backend.get(_lease_key(db_id))
        except NotFound:
            await self.backend.put(_lease_key(db_id), mine, if_none_match=True)
            return
        holder = _holder(data)
        if holder == self.holder:
            return
        if holder is not None:
            expires = await self._expires(holder)
            if expires is not None and self.clock() <= expires + self.margin:
                raise LeaseHeld(db_id, holder, expires)
            log.warning("taking over %s from gateway %s, whose heartbeat %s", db_id, holder,
                        "is missing" if expires is None else f"expired {self.clock() - expires:.0f} s ago")
        await self.backend.put(_lease_key(db_id), mine, if_match=etag)

    async def _expires(self, holder: str) -> float | None:
        try:
            data, _ = await self.backend.get(_beat_key(holder))
            return float(json.loads(data)["expires"])
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # an unreadable heartbeat is no proof of life

    def release_later(self, db_id: str) -> None:
        """The database stopped and is saved: keep the lease for another `ttl` (a quick
        reconnect then needs no storage round trip, even while storage is down), then give it
        up in `keep_alive`."""
        if self.enabled and db_id in self.held:
            self._idle.setdefault(db_id, self.monotonic())

    async def release_idle(self, *, older_than: float = 0.0) -> None:
        """Give up the leases of stopped databases (all of them at shutdown)."""
        now = self.monotonic()
        for db_id, since in list(self._idle.items()):
            if now - since >= older_than:
                await self.release(db_id)

    async def release(self, db_id: str) -> None:
        """Give `db_id` up (after its last changes are saved). A failed release is retried."""
        self._idle.pop(db_id, None)
        if not self.enabled or db_id not in self.held:
            return
        self.held.discard(db_id)
        try:
            await self._release(db_id)
        except StorageError as e:
            self._unreleased.add(db_id)
            log.warning("releasing the lease of %s failed (retried later): %s", db_id, e)

    async def _release(self, db_id: str) -> None:
        try:
            data, _ = await self.backend.get(_lease_key(db_id))
        except NotFound:
            data = b"{}"
        if _holder(data) == self.holder:
            # no other gateway takes over a lease whose holder is alive, so between this read
            # and the delete it stays ours; deleting (not writing "free") leaves nothing behind
            # for a database that was never created
            await self.backend.delete([_lease_key(db_id)])
        self._unreleased.discard(db_id)

    async def keep_alive_forever(self, on_expired: Callable[[], Awaitable[None]]) -> None:
        """Renew the heartbeat while leases are held; retry failed releases. When renewal has
        failed for too long, call `on_expired` (stop the instances) before others may take over."""
        while True:
            await asyncio.sleep(max(0.05, self.ttl / 3))
            await self.keep_alive(on_expired)

    async def keep_alive(self, on_expired: Callable[[], Awaitable[None]]) -> None:
        if not self.enabled or not (self.held or self._unreleased or self.lapsed):
            return
        try:
            await self.beat()
        except StorageError as e:
            log.warning("renewing this gateway's lease heartbeat failed: %s", e)
        if self.fencing_needed():
            log.error("lease heartbeat not renewed for %.0f s: stopping this gateway's databases "
                      "so another gateway can safely take them over", self.ttl - self.margin)
            await on_expired()
            self.lapsed.clear()
        try:  # only now: a lapsed lease is given up after its instance has stopped
            for db_id in list(self._unreleased - self.held - self.lapsed):
                await self._release(db_id)
            await self.release_idle(older_than=self.ttl)
        except StorageError as e:
            log.warning("releasing leases failed (retried later): %s", e)


def _holder(data: bytes) -> str | None:
    try:
        holder = json.loads(data).get("holder")
    except (ValueError, AttributeError):
        return None  # a damaged lease holds nothing
    return holder if isinstance(holder, str) and holder else None
