"""The job store's event log and `follow`, in memory and on a real redis-server.

Every write counts in the record's version; a write that changes the public
job object, up to the first terminal state, is logged with it in the same
transaction; `follow` reads that log. A watcher that is cancelled leaves no
waiter behind: the store's subscriber count goes back to 0 and, on Redis, no
client stays blocked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from gateway.jobs import events as events_module
from gateway.jobs.events import MIN_STREAM_S, STREAM_GRACE_S, caught_up, follow, stream_end
from gateway.jobs.model import JobRecord, new_job_id
from gateway.jobs.store import JobEvent, JobStore, MemoryJobStore, RedisJobStore
from tests.redis_server import RedisServer, redis_available


def new_record(deadline_s: float = 60.0, created: float | None = None) -> JobRecord:
    now = time.time() if created is None else created
    return JobRecord(id=new_job_id(now), owner="o", route="generations", job={"deadline_s": deadline_s}, base_url="", created=now)


def running(r: JobRecord) -> bool:
    r.status = "running"
    return True


def attempted(r: JobRecord) -> bool:
    r.attempts += 1
    return True


def bookkeeping(r: JobRecord) -> bool:
    r.provider_jobs = {"fal": ["req-1"]}  # not in the job object: a write, but no event
    return True


def succeeded(r: JobRecord) -> bool:
    r.status, r.completed = "succeeded", time.time()
    return True


def webhook_noted(r: JobRecord) -> bool:
    r.metadata = {"after": "end"}  # a change of the job object after its end: not logged
    return True


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[JobStore]:
    if request.param == "memory":
        yield MemoryJobStore(3600)
        return
    server = request.getfixturevalue("redis_server")
    client = aioredis.from_url(server.url, decode_responses=True, socket_timeout=5.0)
    try:
        yield RedisJobStore(client, namespace=f"ev-{uuid.uuid4().hex[:8]}", retention_s=3600)
    finally:
        await client.aclose()


async def test_each_change_of_the_job_object_is_logged_with_its_version_up_to_the_end(store: JobStore) -> None:
    record = new_record()
    await store.create(record)
    for change in (running, attempted, bookkeeping, succeeded, webhook_noted):
        await store.update(record.id, change)
    final = await store.get(record.id)
    assert final is not None and final.version == 6
    logged = await store.events(record.id, 0, 0.0)
    assert [(v, j["status"], j["attempts"]) for v, j in logged] == [(1, "queued", 0), (2, "running", 0), (3, "running", 1), (5, "succeeded", 1)]
    assert [v for v, _ in await store.events(record.id, 3, 0.0)] == [5]
    assert await store.events(record.id, 5, 0.0) == []
    assert store.subscribers == 0


async def test_a_waiting_reader_wakes_on_the_next_change_not_at_its_timeout(store: JobStore) -> None:
    record = new_record()
    await store.create(record)
    waiting = asyncio.ensure_future(store.events(record.id, 1, 2.5))
    await asyncio.sleep(0.2)
    assert store.subscribers == 1
    started = time.monotonic()
    await store.update(record.id, running)
    found = await asyncio.wait_for(waiting, 2.0)
    assert [(v, j["status"]) for v, j in found] == [(2, "running")]
    assert time.monotonic() - started < 1.0
    assert store.subscribers == 0


async def test_a_cancelled_reader_leaves_no_waiter_and_no_blocked_redis_client(store: JobStore, request: pytest.FixtureRequest) -> None:
    record = new_record()
    await store.create(record)
    waiting = asyncio.ensure_future(store.events(record.id, 1, 2.5))
    await asyncio.sleep(0.2)
    assert store.subscribers == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert store.subscribers == 0
    if isinstance(store, RedisJobStore):
        server = request.getfixturevalue("redis_server")
        probe = aioredis.from_url(server.url, decode_responses=True)
        try:
            deadline = time.monotonic() + 2
            while (await probe.info("clients"))["blocked_clients"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (await probe.info("clients"))["blocked_clients"] == 0
        finally:
            await probe.aclose()


async def collect(store: JobStore, record: JobRecord, last: int | None, limit: float = 5.0) -> list[JobEvent | None]:
    out: list[JobEvent | None] = []

    async def run() -> None:
        async for event in follow(store, record, last):
            out.append(event)

    await asyncio.wait_for(run(), limit)
    return out


async def test_follow_sends_the_state_now_then_each_change_and_ends_after_the_terminal_one(store: JobStore) -> None:
    record = new_record()
    await store.create(record)

    async def work() -> None:
        for change in (running, bookkeeping, attempted, succeeded):
            await asyncio.sleep(0.05)
            await store.update(record.id, change)

    worker = asyncio.ensure_future(work())
    got = await collect(store, record, None)
    await worker
    assert [(e[0], e[1]["status"]) for e in got if e] == [(1, "queued"), (2, "running"), (4, "running"), (5, "succeeded")]
    final = await store.get(record.id)
    assert final is not None and got[-1] == (5, final.public())
    assert store.subscribers == 0

    # Resuming from a middle event gives exactly the later ones; from the last, nothing (the HTTP layer answers 204).
    assert [e[0] for e in await collect(store, final, 2) if e] == [4, 5]
    assert caught_up(final, 5) and not caught_up(final, 4) and not caught_up(final, None)
    assert await collect(store, final, 5) == []


async def test_a_terminal_job_without_last_event_id_is_one_event_its_current_object(store: JobStore) -> None:
    record = new_record()
    await store.create(record)
    for change in (running, succeeded, webhook_noted):
        await store.update(record.id, change)
    final = await store.get(record.id)
    assert final is not None
    assert await collect(store, final, None) == [(final.version, final.public())]


async def test_keep_alives_come_while_nothing_changes(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "KEEPALIVE_S", 0.2)
    record = new_record()
    await store.create(record)
    got: list[JobEvent | None] = []

    async def run() -> None:
        async for event in follow(store, record, None):
            got.append(event)

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0.7)
    await store.update(record.id, succeeded)
    await asyncio.wait_for(task, 3.0)
    assert got[0] is not None and got[-1] is not None and got[-1][1]["status"] == "succeeded"
    assert 2 <= got.count(None) <= 4
    assert store.subscribers == 0


def test_a_stream_lasts_until_the_deadline_plus_grace_within_the_retention_and_at_least_a_while() -> None:
    now = time.time()
    fresh = new_record(deadline_s=600, created=now)
    assert stream_end(fresh, 86400, now) == pytest.approx(now + 600 + STREAM_GRACE_S)
    assert stream_end(fresh, 300, now) == pytest.approx(now + 300)  # never past the record's retention
    old = new_record(deadline_s=600, created=now - 3600)
    assert stream_end(old, 86400, now) == pytest.approx(now + MIN_STREAM_S)  # a late reconnect: a calm stream, not a tight loop


def test_a_record_written_by_a_newer_replica_with_fields_this_one_lacks_still_reads() -> None:
    """Rolling upgrades: two versions share one store, so unknown fields are left out, not fatal."""
    from gateway.jobs.model import JobRecord

    stored = {"id": "imgjob_1", "owner": None, "route": "generations", "job": {}, "base_url": "http://127.0.0.1", "created": 1.0, "status": "queued", "a_field_from_the_future": 7}
    record = JobRecord.from_json(stored)
    assert (record.id, record.status, record.cancel_requested) == ("imgjob_1", "queued", None)
