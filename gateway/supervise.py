"""Background loops that outlive their errors: each round is guarded, an unexpected error is
logged with its traceback and counted (pgsni_background_errors_total{loop}), and the loop goes
on at its next round. Cancellation (shutdown) ends the loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from .metrics import Metrics

log = logging.getLogger("pgsni.background")


async def every(name: str, interval: Callable[[], float], step: Callable[[], Awaitable[None]],
                metrics: Metrics) -> None:
    """Run `step()` every `interval()` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval())
        try:
            await step()
        except Exception:  # noqa: BLE001  (a background loop must not die of one bad round)
            metrics.background_errors.labels(name).inc()
            log.exception("background loop %s failed; it runs again in %.1f s", name, interval())


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until each has ended (whatever it was doing)."""
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for t, result in zip(tasks, results):
        if isinstance(result, Exception):
            log.error("background task %s ended with %r", t.get_name(), result)
