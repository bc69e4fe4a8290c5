"""How late this process's event loop runs: the gateway's own overload, told apart from a backend's.

When more requests arrive than one worker's CPU can take (thousands at
once), each turn of the event loop runs every callback that became ready
during the previous one, and a turn can take seconds. A connect timer of
5 s then fires before the loop has looked at the socket whose connect
finished long ago: the attempt fails as UNREACHABLE although the backend
answered at once. Counted against the backend, such failures open its
breaker, and every request after them is refused with 503s, for a fault
that is the gateway's alone.

`LoopLag` measures it: a timer every `TICK_S` notes how late it fired, and
`worst_since(t)` is the latest any tick (the one overdue now included) ran
since instant `t` (`time.monotonic()`). Dispatch asks it about an attempt
that could not reach its backend (gateway/dispatch/attempts.py). It costs one timer
callback every `TICK_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque

TICK_S = 0.1
NOTED_LATE_S = 0.05  # ticks later than this are kept; a busy but healthy loop runs a few ms late
KEPT = 1024  # late ticks remembered; at one tick per slow loop turn, minutes of them


class LoopLag:
    """The lateness of the running loop's timers, kept for the attempts that ask."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self._late: deque[tuple[float, float]] = deque(maxlen=KEPT)  # (when noted, how late)
        self._due: float | None = None  # when the pending tick should fire
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self) -> None:
        """Start ticking on the running loop, if not already (cheap to call per request)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        self._loop = loop
        self._due = None
        self._task = loop.create_task(self._tick(), name="klein-loop-lag", context=contextvars.Context())  # no request's context kept alive

    async def _tick(self) -> None:
        while True:
            due = time.monotonic() + self.tick_s
            self._due = due
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            late = now - due
            if late >= NOTED_LATE_S:
                self._late.append((now, late))

    def worst_since(self, since: float) -> float:
        """The most, in seconds, the loop ran late from `since` until now."""
        now = time.monotonic()
        worst = max(0.0, now - self._due) if self._due is not None else 0.0
        for noted, late in reversed(self._late):
            if noted < since:
                break
            worst = max(worst, late)
        return worst

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
