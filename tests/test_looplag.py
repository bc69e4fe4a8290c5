"""gateway.dispatch.overload: how late the event loop ran, for telling the gateway's overload from a backend's failure."""

from __future__ import annotations

import asyncio
import time

from gateway.dispatch.overload import LoopLag


async def test_a_loop_held_by_blocking_work_reads_as_late_and_a_free_one_does_not() -> None:
    lag = LoopLag(tick_s=0.02)
    lag.watch()
    await asyncio.sleep(0.1)
    before = time.monotonic()
    assert lag.worst_since(before) < 0.05
    time.sleep(0.3)  # other requests' CPU, holding the loop
    assert lag.worst_since(before) >= 0.25  # the overdue tick, before it has fired
    await asyncio.sleep(0.05)
    assert lag.worst_since(before) >= 0.25  # and once it fired late
    await asyncio.sleep(0.1)
    assert lag.worst_since(time.monotonic()) < 0.05  # a window after the stall sees none of it
    await lag.stop()


async def test_watching_twice_on_one_loop_keeps_one_ticker() -> None:
    lag = LoopLag(tick_s=0.02)
    lag.watch()
    first = lag._task
    lag.watch()
    assert lag._task is first
    await lag.stop()
    assert first is not None and first.done()
