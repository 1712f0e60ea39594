"""An asyncio event loop on virtual time, for simulations: `time()` is a number that moves
only when every task waits, straight to the next timer, so hours pass in milliseconds and a
run replays exactly. Code is grouped under owners (a simulated machine: `owned_by`), and an
owner can be paused (none of its callbacks run until `resume`: a GC or VM pause) or killed
(none ever run again: a crash).

Not `looptime` (on PyPI): it fast-forwards the loop's time as this does, but cannot pause or
kill one group of tasks while the others go on, which is what a lease simulation is about.
The loop never sleeps for real: the selector is asked for ready file descriptors without
waiting, and if there are none, time jumps by the timeout the loop wanted to wait."""

from __future__ import annotations

import asyncio
import contextvars
import selectors
from typing import Any, Callable

OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("sim_owner", default=None)


class Deadlock(RuntimeError):
    """Nothing is ready, no timer is due and nothing can wake the loop."""


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: "VirtualTimeLoop") -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None):
        if timeout == 0:
            return []  # callbacks are ready: file descriptors wait until the loop would sleep
        if timeout is None:
            raise Deadlock("every task waits and no timer is set")
        events = super().select(0)
        if not events:
            self._loop.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        super().__init__(_JumpingSelector(self))
        self._held: dict[str, list[tuple[asyncio.Handle, Callable, tuple, Any]]] = {}
        self._dead: set[str] = set()
        self._tasks: set[asyncio.Task] = set()  # kept until done: see `kill`

    def time(self) -> float:
        return self.now

    def owned_by(self, owner: str | None) -> contextvars.Context:
        """A context whose tasks (and the tasks they start) belong to `owner`."""
        ctx = contextvars.copy_context()
        ctx.run(OWNER.set, owner)
        return ctx

    def create_task(self, coro, **kwargs) -> asyncio.Task:
        task = super().create_task(coro, **kwargs)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard, context=contextvars.Context())
        return task

    def spawn(self, owner: str | None, coro) -> asyncio.Task:
        return self.create_task(coro, context=self.owned_by(owner))

    def pause(self, owner: str) -> None:
        self._held.setdefault(owner, [])

    def paused(self, owner: str) -> bool:
        return owner in self._held

    def resume(self, owner: str) -> None:
        if owner in self._dead:
            return
        for handle, callback, args, context in self._held.pop(owner, []):
            if not handle.cancelled():
                super().call_soon(callback, *args, context=context)

    def kill(self, owner: str) -> None:
        """Nothing of `owner` runs again (its tasks stay pending, as after a crash). Every task
        is kept until done or `close`: a pending task nobody refers to would otherwise be
        collected (its coroutine closed) at whatever moment the garbage collector runs.
        A restarted machine takes a new owner name."""
        self._dead.add(owner)
        self.pause(owner)

    def close(self) -> None:
        """Cancel every task (paused and killed owners' too) and let them end before closing:
        pending tasks left to the garbage collector would run their cleanup at random."""
        self._dead.clear()
        for owner in list(self._held):
            self.resume(owner)
        for _ in range(3):  # a task may ignore one cancellation (and go on to wait again)
            tasks = [t for t in self._tasks if not t.done()]
            if not tasks or self.is_closed():
                break
            for t in tasks:
                t.cancel()
            self.run_until_complete(asyncio.wait(tasks, timeout=3600))
        super().close()

    def call_soon(self, callback, *args, context=None):
        owner = OWNER.get() if context is None else context.get(OWNER)
        if owner is not None and owner in self._held:
            handle = asyncio.Handle(callback, args, self, context)
            self._held[owner].append((handle, callback, args, context))
            return handle
        return super().call_soon(callback, *args, context=context)
