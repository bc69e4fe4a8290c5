"""Resuming a provider job another process submitted, over real sockets.

The submitting process "dies" (its generate task is cancelled after the
provider gave the job an id, with nobody cancelling the provider job); a
fresh adapter resumes by the noted ids and gets the images, and the
emulator's counters show no second paid job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.domain.job import ImageJob, JobKind
from gateway.providers.base import ProviderError, job_id_listener
from tests.emulators.support import stats
from tests.emulators.test_with_adapters import make_adapter

QUEUED = ["fal", "replicate", "runflow"]


async def submit_and_abandon(adapter, job: ImageJob, expected_ids: int) -> list[str]:
    noted: list[tuple[str, str]] = []
    token = job_id_listener.set(lambda backend, job_id: noted.append((backend, job_id)))
    try:
        task = asyncio.ensure_future(adapter.generate(job, time.monotonic() + 20))
    finally:
        job_id_listener.reset(token)
    deadline = time.monotonic() + 10
    while len(noted) < expected_ids and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()  # a finished task (Replicate's Prefer: wait can return the result) is left as it is
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert {backend for backend, _ in noted} == {adapter.name}
    return [job_id for _, job_id in noted]


@pytest.mark.parametrize(("name", "n"), [("fal", 1), ("fal", 2), ("replicate", 1), ("replicate", 2), ("runflow", 1)])
async def test_a_fresh_adapter_resumes_an_abandoned_job_without_paying_again(client, fleet, name, n):
    fleet[name].set_knobs({"job": {"queue_ms": 600, "run_ms": 200}})
    job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=1024, height=1024, n=n)
    ids = await submit_and_abandon(make_adapter(fleet, name, client), job, expected_ids=n if name == "replicate" else 1)
    paid = (await stats(client, fleet, name))["generations"]
    assert paid >= 1

    resumed = make_adapter(fleet, name, client)
    assert resumed.resumable
    result = await resumed.resume(job, ids, time.monotonic() + 20)
    assert len(result.images) == n
    assert all((img.width, img.height) in ((1024, 1024), (None, None)) for img in result.images)
    assert (await stats(client, fleet, name))["generations"] == paid


@pytest.mark.parametrize("name", QUEUED)
async def test_resuming_an_id_the_provider_does_not_know_fails_without_submitting(client, fleet, name):
    adapter = make_adapter(fleet, name, client)
    job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=512, height=512)
    with pytest.raises(ProviderError):
        await adapter.resume(job, ["no-such-job-0000"], time.monotonic() + 3)
    assert (await stats(client, fleet, name))["generations"] == 0


@pytest.mark.parametrize("name", ["empiriolabs", "local"])
async def test_synchronous_providers_cannot_resume(client, fleet, name):
    adapter = make_adapter(fleet, name, client)
    assert not adapter.resumable
    with pytest.raises(ProviderError):
        await adapter.resume(ImageJob(kind=JobKind.GENERATE, prompt="x", width=512, height=512), ["x"], time.monotonic() + 1)
