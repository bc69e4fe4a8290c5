"""The drain's bookkeeping (gateway.dispatch.shutdown.Drain) and the app's SIGTERM path,
in one process: what finishes, what is cancelled and counted, and that the
server is told to exit only after."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from gateway.app import drain_then_exit
from gateway.dispatch.shutdown import Drain
from tests.gateway_support import NO_LEDGER, REPO, make_app


async def tracked(drain: Drain, seconds: float, counter: list[int]) -> asyncio.Task[None]:
    """A request's work in flight: counted while it runs, tracked by the drain."""

    async def work() -> None:
        counter[0] += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            counter[0] -= 1

    task = asyncio.ensure_future(work())

    async def hold() -> None:
        with drain.tracking(task):
            await asyncio.gather(task, return_exceptions=True)

    holder = asyncio.ensure_future(hold())
    task.add_done_callback(lambda _: holder)  # the holder lives as long as the task it tracks
    await asyncio.sleep(0)
    return task


@pytest.mark.parametrize(
    ("work_s", "grace_s", "cancelled"),
    [(0.05, 2.0, 0), (5.0, 0.2, 1), (0.0, 0.2, 0)],
    ids=["finishes-within-grace", "outlives-grace", "nothing-in-flight"],
)
async def test_settle_waits_for_work_and_cancels_what_outlives_the_grace(work_s: float, grace_s: float, cancelled: int) -> None:
    drain = Drain(grace_s=grace_s)
    busy = [0]
    task = await tracked(drain, work_s, busy) if work_s else None
    assert await drain.settle(lambda: busy[0], poll_s=0.01) == cancelled
    assert busy[0] == 0
    if task is not None:
        assert task.cancelled() is bool(cancelled)


async def test_hurry_ends_the_grace_at_once() -> None:
    drain = Drain(grace_s=60.0)
    busy = [0]
    task = await tracked(drain, 60.0, busy)
    drain.begin()
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, drain.hurry)
    started = loop.time()
    assert await drain.settle(lambda: busy[0], poll_s=0.01) == 1
    assert loop.time() - started < 2 and task.cancelled()


async def test_the_app_counts_cancelled_requests_and_exits_only_after_draining() -> None:
    app = make_app()
    gw = app.state.gateway
    gw.drain = Drain(grace_s=0.2)
    exited: list[int] = []
    work = await tracked(gw.drain, 60.0, [0])
    gw.in_flight = 1
    work.add_done_callback(lambda _: setattr(gw, "in_flight", 0))
    await drain_then_exit(gw, lambda: exited.append(gw.in_flight))
    assert exited == [0]  # told to exit once nothing was in flight
    assert gw.metrics.registry.get_sample_value("klein_shutdown_cancelled_requests_total") == 1
    assert gw.drain.draining


def test_serve_refuses_the_memory_store_with_several_workers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--allow-unshared-state", "--port", "1", "--config", str(REPO / "providers.yaml")],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "KLEIN_IMAGE_STORE": "memory", **NO_LEDGER},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "memory cannot serve 2 workers" in result.stderr
