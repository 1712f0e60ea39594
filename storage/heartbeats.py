"""The gateways' heartbeats, `gateways/<holder>.json`: what each one says about itself, and
who is alive. A heartbeat is `{"holder", "expires": <unix time>, "ttl"}` (storage/leases.py
writes it and judges takeovers by it), plus, from a gateway with links to the others, its
`address` (advertise_address) and `load` (e.g. `{"running": 3, "max": 50}`, with
`"draining": 1` once it has begun to shut down: it saves and gives up its databases, and the
others wait for their leases instead of sending it clients). A worker of a machine with links
(`pgsni serve --workers N`) publishes its local channel as `local` beside its network address,
for the other workers of its machine. Heartbeats of older gateways have none of these and stay
readable: they have no address, so nobody links to them."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field, replace

from .backend import Backend
from .errors import NotFound

PREFIX = "gateways/"
READ_CONCURRENCY = 8  # heartbeat reads in flight at once while listing the fleet


def beat_key(holder: str) -> str:
    return f"{PREFIX}{holder}.json"


@dataclass(frozen=True)
class Heartbeat:
    holder: str
    expires: float
    ttl: float
    address: str = ""  # HOST:PORT of its internal listener; empty: no links
    load: dict[str, int] = field(default_factory=dict)
    local: str = ""  # a worker's local channel (local_links.py) beside its network address

    @property
    def draining(self) -> bool:
        """It shuts down: its databases are being saved and given up, it takes no clients."""
        return bool(self.load.get("draining"))

    def encode(self) -> bytes:
        body: dict = {"holder": self.holder, "expires": self.expires, "ttl": self.ttl}
        if self.address:
            body |= {"address": self.address, "load": self.load}
        if self.local:
            body["local"] = self.local
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, data: bytes, default_ttl: float) -> "Heartbeat":
        """ValueError for a heartbeat whose expiry cannot be read (no proof of life). What
        only the links use (address, load) never makes a heartbeat unreadable: the leases
        judge takeovers by it."""
        try:
            beat = json.loads(data)
            expires, ttl = float(beat["expires"]), float(beat.get("ttl", default_ttl))
        except (KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            raise ValueError(f"a damaged heartbeat: {e!r}"[:200]) from None
        if not (math.isfinite(expires) and math.isfinite(ttl)):  # nan compares false with everything
            raise ValueError("a damaged heartbeat: its expiry or ttl is not a finite number")
        address, load, local = beat.get("address"), beat.get("load"), beat.get("local")
        return cls(str(beat.get("holder") or ""), expires, ttl,
                   address if isinstance(address, str) else "",
                   {k: v for k, v in load.items() if isinstance(v, int)} if isinstance(load, dict) else {},
                   local if isinstance(local, str) else "")


async def live_gateways(backend: Backend, now: float) -> list[Heartbeat]:
    """The gateways whose heartbeat has not expired by `now` (unix time), by name. Damaged
    heartbeats and ones deleted while listing are left out."""
    infos = [i for i in await backend.list(PREFIX) if i.key.endswith(".json")]
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(key: str) -> Heartbeat | None:
        async with gate:
            try:
                beat = Heartbeat.decode((await backend.get(key))[0], 0.0)
            except (NotFound, ValueError):
                return None
            return beat if beat.holder else replace(beat, holder=key[len(PREFIX):-len(".json")])

    beats = await asyncio.gather(*(read(i.key) for i in infos))
    return sorted((b for b in beats if b is not None and b.expires >= now), key=lambda b: b.holder)
