"""Graceful shutdown: on SIGTERM, stop admitting work, let what is in flight finish, then exit.

In order: readiness answers 503 at once (load balancers stop sending), a new
request gets 503 with Retry-After and `connection: close`, requests in flight
run to their end within `shutdown_grace_s`; any still running then are
cancelled (dispatch cancels their provider jobs where the provider allows),
answered 503 and counted; only then is the server told to exit, and it exits 0.
A second SIGTERM ends the grace at once.
Each worker process drains itself: uvicorn's supervisor forwards SIGTERM to
every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from gateway.domain.errors import GatewayError

# After cancelling, how long handlers get to answer: dispatch waits up to
# CANCEL_TIMEOUT_S (2 s) for each provider cancel.
ANSWER_AFTER_CANCEL_S = 3.0


class ShuttingDown(GatewayError):
    """503: this process is draining. Nothing was started (or what was, was cancelled),
    so the request is safe to send again; a load balancer may retry it elsewhere."""

    status = 503
    type = "server_error"
    code = "shutting_down"
    retryable_default = True


class Drain:
    """What one process does between SIGTERM and exit; pure bookkeeping, no signals."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.clock = clock
        self.draining = False
        self.deadline: float | None = None
        self._work: set[asyncio.Task[Any]] = set()
        self._stopped: set[asyncio.Task[Any]] = set()

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.deadline = self.clock() + self.grace_s

    def hurry(self) -> None:
        """End the grace now (a second SIGTERM): cancel what runs, answer, exit."""
        self.begin()
        self.deadline = self.clock()

    @contextlib.contextmanager
    def tracking(self, task: asyncio.Task[Any]) -> Iterator[None]:
        """Hold `task` (a request's work) as in flight, so the drain can cancel it at the deadline."""
        self._work.add(task)
        try:
            yield
        finally:
            self._work.discard(task)
            self._stopped.discard(task)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Hold `task` (work that outlives its request, such as a follow-up) until it ends."""
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    def stopped(self, task: asyncio.Task[Any]) -> bool:
        """Whether the drain cancelled this work (rather than its caller leaving)."""
        return task in self._stopped

    async def settle(self, busy: Callable[[], int], poll_s: float = 0.05) -> int:
        """Wait until nothing is busy or the grace ends, cancel the work still running,
        give its handlers a moment to answer; returns how many were cancelled."""
        self.begin()
        assert self.deadline is not None
        while busy() and self.clock() < self.deadline:
            await asyncio.sleep(poll_s)
        left = [t for t in self._work if not t.done()]
        for task in left:
            self._stopped.add(task)
            task.cancel()
        end = self.clock() + ANSWER_AFTER_CANCEL_S
        while left and busy() and self.clock() < end:
            await asyncio.sleep(poll_s)
        return len(left)


def on_sigterm(start: Callable[[], None], again: Callable[[], None]) -> tuple[Callable[[], None], Callable[[], None]]:
    """Call `start` in the running loop at the first SIGTERM, `again` at each later one.

    Returns (uninstall, exit_now): exit_now hands the deferred SIGTERM to the
    handler that was there before (uvicorn's) once the drain is over. Off the
    main thread (test clients) nothing is installed and exit_now does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return (lambda: None), (lambda: None)
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    fired = False

    def handler(sig: int, frame: Any) -> None:
        nonlocal fired
        loop.call_soon_threadsafe(again if fired else start)
        fired = True

    def uninstall() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    signal.signal(signal.SIGTERM, handler)
    return uninstall, lambda: _forward(previous, signal.SIGTERM, None)


def _forward(previous: Any, sig: int, frame: Any) -> None:
    if callable(previous):
        previous(sig, frame)
        return
    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    os.kill(os.getpid(), sig)
