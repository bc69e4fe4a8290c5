"""The one polling loop the job-following adapters share (fal, Replicate, Runflow)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.providers._wire import follow_job
from gateway.providers.base import FailureClass, ProviderError, Timeouts

FAST = Timeouts(poll_interval=0.01, max_poll_interval=0.02)


@pytest.mark.parametrize(
    ("wait_first", "expected"),
    [
        (False, ["poll", 0.01, "poll", 0.015, "poll"]),
        (True, [0.01, "poll", 0.015, "poll", 0.02, "poll"]),
    ],
)
async def test_polls_with_backoff_until_the_poll_returns_an_end(monkeypatch: pytest.MonkeyPatch, wait_first: bool, expected: list[object]) -> None:
    """The schedule, as the loop asks for it: poll_interval x 1.5 per poll, capped at max_poll_interval."""
    events: list[object] = []

    async def sleep(delay: float) -> None:
        events.append(round(delay, 6))

    async def poll() -> str | None:
        events.append("poll")
        return "done" if events.count("poll") == 3 else None

    monkeypatch.setattr(asyncio, "sleep", sleep)
    assert await follow_job(poll, timeouts=FAST, deadline=time.monotonic() + 60, job_id="job-1", wait_first=wait_first) == "done"
    assert events == expected


async def test_past_the_deadline_the_outcome_is_unknown_and_carries_the_job_id() -> None:
    async def poll() -> str | None:
        return None

    with pytest.raises(ProviderError) as caught:
        await follow_job(poll, timeouts=FAST, deadline=time.monotonic() + 0.05, job_id="job-2", wait_first=True)
    assert (caught.value.failure, caught.value.job_id, caught.value.billed) == (FailureClass.UNKNOWN_OUTCOME, "job-2", True)


async def test_a_poll_that_raises_ends_the_loop_with_its_error() -> None:
    async def poll() -> str | None:
        raise ProviderError(FailureClass.FAILED, "job failed", job_id="job-3")

    with pytest.raises(ProviderError, match="job failed"):
        await follow_job(poll, timeouts=FAST, deadline=time.monotonic() + 5, job_id="job-3", wait_first=False)
