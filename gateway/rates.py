"""A token bucket, sans-IO, with an injectable clock: how fast instances may be started
(wake_rate, wake_burst)."""

from __future__ import annotations

import time
from typing import Callable

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens a second up to `burst` (rate 0: unlimited). `reserve` hands tokens out
    in arrival order: a caller that must wait is told how long, and its token is already its."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self.tokens = float(self.burst)
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait before using a token (0: now), or None (nothing taken) if that
        would be longer than `max_wait`."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        wait = max(0.0, (1 - self.tokens) / self.rate)
        if wait > max_wait:
            return None
        self.tokens -= 1  # may go negative: the debt of the callers already waiting
        return wait
