"""Admission limits, sans-IO: connection counters and a sliding window of failed logins
(the token bucket for instance starts is gateway/rates.py's). Each class takes a clock, so
tests need no sleeping."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Hashable

from gateway import errors
from gateway.errors import GatewayError
from gateway.rates import Clock


class ConnectionCounter:
    """Connections held per key, each key capped at `limit` (0: no cap, only counting)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[Hashable, int] = {}

    def try_acquire(self, key: Hashable = None) -> bool:
        n = self.counts.get(key, 0)
        if self.limit and n >= self.limit:
            return False
        self.counts[key] = n + 1
        return True

    def release(self, key: Hashable = None) -> None:
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:  # keys with no connection take no memory
            self.counts.pop(key, None)

    def __getitem__(self, key: Hashable) -> int:
        return self.counts.get(key, 0)


class SlidingWindow:
    """Events per key in the last `window` seconds; a key with `limit` of them is blocked
    (limit 0: never). Memory is bounded: at most `limit` times per key, at most `max_keys`
    keys (the least recently recorded are forgotten first), expired keys are dropped."""

    def __init__(self, limit: int, window: float = 60.0, clock: Clock = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.limit, self.window, self.clock, self.max_keys = limit, window, clock, max_keys
        self.events: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def blocked(self, key: Hashable) -> bool:
        if not self.limit:
            return False
        times = self.events.get(key)
        if times is None:
            return False
        self._expire(times, self.clock())
        if not times:  # nothing left in the window: the key takes no memory (nor sits in _prune's way)
            del self.events[key]
            return False
        return len(times) >= self.limit

    def record(self, key: Hashable) -> None:
        if not self.limit:
            return
        now = self.clock()
        times = self.events.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        self.events[key] = times  # now the most recently recorded key
        self._prune(now)

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def _prune(self, now: float) -> None:
        # keys are in order of their newest event: expired ones are at the front
        while self.events:
            key, times = next(iter(self.events.items()))
            if len(self.events) > self.max_keys or not times or times[-1] <= now - self.window:
                del self.events[key]
            else:
                break

    def __len__(self) -> int:
        return len(self.events)


# clients over a connection cap are told so (53300 after TLS and their startup message, as
# Postgres does), but only so many at a time, each within a short time: beyond, the socket is
# closed at once, or a cap would bound nothing of what an address holds open
REFUSING_PER_IP = 8
REFUSING_TOTAL = 256
REFUSING_SECONDS = 3.0


class Limits:
    """The gateway's connection caps and failed-login windows, built from its settings."""

    def __init__(self, settings, clock: Clock = time.monotonic) -> None:
        s = settings
        self.total = ConnectionCounter(s.max_client_connections)
        self.per_ip = ConnectionCounter(s.max_connections_per_ip)
        self.per_db = ConnectionCounter(s.max_connections_per_db)
        self.refusing_total = ConnectionCounter(REFUSING_TOTAL)  # refused clients being told
        self.refusing_ip = ConnectionCounter(REFUSING_PER_IP)
        self.failed_ip = SlidingWindow(s.auth_failures_per_minute, clock=clock)
        self.failed_db = SlidingWindow(s.auth_failures_per_minute, clock=clock)

    def admit(self, ip: str) -> GatewayError | None:
        """Count a new client connection, or return its refusal (and count nothing)."""
        if not self.total.try_acquire():
            return errors.gateway_full(self.total.limit)
        if not self.per_ip.try_acquire(ip):
            self.total.release()
            return errors.too_many_connections_from(ip, self.per_ip.limit)
        return None

    def leave(self, ip: str) -> None:
        self.total.release()
        self.per_ip.release(ip)

    def refusing(self, ip: str) -> bool:
        """Count a refused client while it is told why (release with `refused`), or False:
        too many are being told already (from `ip` or at all), close it without a word."""
        if not self.refusing_total.try_acquire():
            return False
        if not self.refusing_ip.try_acquire(ip):
            self.refusing_total.release()
            return False
        return True

    def refused(self, ip: str) -> None:
        self.refusing_total.release()
        self.refusing_ip.release(ip)

    def enter_db(self, db_id: str) -> None:
        """Count a connection to a database (release with `per_db.release`), or raise."""
        if not self.per_db.try_acquire(db_id):
            raise errors.too_many_connections_to(db_id, self.per_db.limit)

    def check_auth(self, ip: str, db_id: str) -> None:
        if self.failed_ip.blocked(ip) or self.failed_db.blocked(db_id):
            raise errors.too_many_auth_failures()

    def auth_failed(self, ip: str, db_id: str) -> None:
        self.failed_ip.record(ip)
        self.failed_db.record(db_id)
