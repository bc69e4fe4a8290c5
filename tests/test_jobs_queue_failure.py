"""A job whose queue write fails is never left listed as `queued`.

The record is stored before the queue write (a worker must never claim a job
it cannot read); when that write fails the record is marked failed with
`job_not_queued` and the caller gets a 503 in the error envelope.
"""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway.jobs.queue import MemoryJobQueue
from tests.gateway_support import FakeAdapter, install_fakes, make_app

ASYNC = {"Prefer": "respond-async"}
BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "b64_json"}
BACKENDS = ["local", "replicate", "fal", "empiriolabs", "runflow"]


class RedisLikeError(Exception):
    """Stands in for a redis client's error (its module is not the builtins)."""


class RaisingQueue(MemoryJobQueue):
    """A queue whose every enqueue raises `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.tried: list[str] = []

    async def enqueue(self, job_id: str) -> None:
        self.tried.append(job_id)
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ConnectionError("connection reset"), id="connection-reset"),
        pytest.param(TimeoutError(), id="timeout"),
        pytest.param(RedisLikeError("READONLY You can't write against a read only replica"), id="redis-error"),
        pytest.param(RuntimeError("anything else"), id="unexpected"),
    ],
)
async def test_a_failed_queue_write_answers_503_and_leaves_the_job_failed_not_queued(error: Exception) -> None:
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in BACKENDS}
    install_fakes(app, fakes)
    queue = RaisingQueue(error)
    async with AsyncTestClient(app) as client:
        app.state.gateway.jobs.queue = queue
        resp = await client.post("/v1/images/generations", json=BODY, headers=ASYNC)
        queued = (await client.get("/v1/images/jobs", params={"status": "queued"})).json()["data"]
        listed = (await client.get("/v1/images/jobs")).json()["data"]
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "job_not_queued" and resp.json()["error"]["type"] == "server_error"
    assert resp.headers["x-should-retry"] == "true" and "retry-after" in resp.headers
    assert queued == []
    [job] = listed
    assert job["id"] == queue.tried[0]
    assert job["status"] == "failed" and job["error"]["code"] == "job_not_queued"
    assert all(not f.calls for f in fakes.values())  # nothing was generated, nothing billed


async def test_a_queue_write_that_works_leaves_the_job_queued_for_the_worker() -> None:
    app = make_app()
    install_fakes(app, {n: FakeAdapter(n) for n in BACKENDS})
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers=ASYNC)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
