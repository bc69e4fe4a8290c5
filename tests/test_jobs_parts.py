"""The parts of async jobs on their own: URL rules, signatures, the record,
and the Redis queue, store and webhook schedule against a real redis-server."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
import standardwebhooks

from gateway.domain.errors import InvalidRequest
from gateway.domain.job import ImageJob, JobKind, ProviderPrefs, ReferenceImage
from gateway.jobs.deliveries import MemoryDeliverySchedule, RedisDeliverySchedule
from gateway.jobs.model import (
    JobRecord,
    Webhook,
    job_from_dict,
    job_to_dict,
    new_job_id,
)
from gateway.jobs.queue import MemoryJobQueue, RedisJobQueue
from gateway.jobs.store import MemoryJobStore, RedisJobStore
from gateway.jobs.webhooks import (
    Allowlist,
    WebhookSecretError,
    check_url,
    next_delay,
    parse_secret,
    refusal_at_delivery,
    signed_headers,
)
from tests.redis_server import RedisServer, redis_available

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

# ---- webhook URL rules -------------------------------------------------------

ALLOW = Allowlist.parse(["127.0.0.1", "hooks.internal", "10.20.0.0/16"])


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://example.com/hook", True),
        ("https://93.184.216.34/hook", True),
        ("http://example.com/hook", False),  # plain http, not allowlisted
        ("http://127.0.0.1:9000/hook", True),  # allowlisted address
        ("http://127.0.0.2:9000/hook", False),  # loopback, not allowlisted
        ("https://localhost/hook", False),
        ("https://api.localhost/hook", False),
        ("https://192.168.1.4/hook", False),
        ("https://169.254.169.254/latest/meta-data", False),  # cloud metadata
        ("https://[::1]/hook", False),
        ("https://[fd00::1]/hook", False),
        ("http://10.20.3.4/hook", True),  # inside an allowlisted CIDR
        ("https://10.21.3.4/hook", False),
        ("http://hooks.internal/x", True),  # allowlisted name
        ("https://user:secret@example.com/hook", False),
        ("ftp://example.com/hook", False),
        ("https:///nohost", False),
        ("https://example.com/" + "a" * 2100, False),
    ],
)
def test_webhook_url_rules(url: str, ok: bool) -> None:
    if ok:
        assert check_url(url, ALLOW) == url
    else:
        with pytest.raises(InvalidRequest) as caught:
            check_url(url, ALLOW)
        assert caught.value.param == "webhook_url" and caught.value.code == "invalid_webhook_url"


async def test_a_name_that_resolves_to_loopback_is_refused_at_delivery_unless_allowlisted() -> None:
    assert await refusal_at_delivery("https://localhost/hook", Allowlist()) is not None
    assert await refusal_at_delivery("https://localhost/hook", Allowlist.parse(["127.0.0.0/8", "::1/128"])) is None


# ---- signatures --------------------------------------------------------------


def test_signatures_verify_with_the_standardwebhooks_package() -> None:
    key = b"k" * 32
    secret = "whsec_" + base64.b64encode(key).decode()
    body = b'{"id":"imgjob_1","event":"image.job.succeeded"}'
    headers = signed_headers(parse_secret(secret), "msg_imgjob_1", body)
    assert standardwebhooks.Webhook(secret).verify(body, headers) == {"id": "imgjob_1", "event": "image.job.succeeded"}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body + b" ", headers)
    stale = signed_headers(parse_secret(secret), "msg_imgjob_1", body, now=time.time() - 3600)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body, stale)


@pytest.mark.parametrize("value", ["whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode(), ""])
def test_a_bad_webhook_secret_is_refused(value: str) -> None:
    with pytest.raises(WebhookSecretError):
        parse_secret(value)


@pytest.mark.parametrize(("attempts", "delay"), [(0, None), (1, 5.0), (2, 30.0), (6, 3600.0), (7, None)])
def test_retry_delays_grow_then_give_up(attempts: int, delay: float | None) -> None:
    assert next_delay([5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0], attempts) == delay


# ---- the record --------------------------------------------------------------


def test_an_image_job_survives_the_record_round_trip() -> None:
    job = ImageJob(
        kind=JobKind.EDIT,
        prompt="p",
        width=512,
        height=768,
        n=2,
        seed=7,
        output_format="webp",
        references=(ReferenceImage("image/png", data=b"\x89PNG...", width=4, height=4), ReferenceImage("image/jpeg", url="https://x.test/a.jpg")),
        prefs=ProviderPrefs(order=("fal",), max_price=Decimal("0.012"), allow_fallbacks=False),
        pinned_backend="fal",
        caller="key_1",
        deadline_s=600,
    )
    record = JobRecord(id=new_job_id(), owner="key_1", route="edits", job=job_to_dict(job), base_url="http://gw", created=time.time(), cost_usd=Decimal("0.0123"), webhook=Webhook("https://h.test"))
    again = JobRecord.from_json(record.to_json())
    assert job_from_dict(again.job) == job
    assert again.public() == record.public() and again.public()["cost_usd"] == "0.0123"


def test_job_ids_sort_by_creation_time() -> None:
    ids = [new_job_id(now) for now in (1_700_000_000.001, 1_700_000_000.002, 1_800_000_000.0)]
    assert ids == sorted(ids)


# ---- Redis queue, store, schedule -------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.from_url(redis_server.url, decode_responses=True)
    yield c
    await c.aclose()


@needs_redis
async def test_a_dead_consumers_job_is_reclaimed_after_the_visibility_timeout_and_not_before(client: aioredis.Redis) -> None:
    ns = uuid.uuid4().hex
    queue = RedisJobQueue(client, namespace=ns)
    await queue.enqueue("imgjob_a")
    taken = await queue.claim("dead", block_s=0.1)
    assert taken is not None and taken.job_id == "imgjob_a"
    assert await queue.claim("alive", block_s=0.1) is None  # delivered to one consumer only
    assert await queue.reclaim("alive", idle_s=0.5, count=5) == []
    await asyncio.sleep(0.6)
    again = await queue.reclaim("alive", idle_s=0.5, count=5)
    assert [m.job_id for m in again] == ["imgjob_a"]
    await queue.ack(again[0])
    await asyncio.sleep(0.6)
    assert await queue.reclaim("third", idle_s=0.5, count=5) == []


@needs_redis
async def test_a_live_consumer_that_touches_its_job_keeps_it(client: aioredis.Redis) -> None:
    queue = RedisJobQueue(client, namespace=uuid.uuid4().hex)
    await queue.enqueue("imgjob_b")
    taken = await queue.claim("worker", block_s=0.1)
    assert taken is not None
    for _ in range(4):
        await asyncio.sleep(0.2)
        await queue.touch("worker", [taken.id])
    assert await queue.reclaim("thief", idle_s=0.5, count=5) == []


@needs_redis
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_queue_depth_and_oldest_age(client: aioredis.Redis, kind: str) -> None:
    queue = MemoryJobQueue() if kind == "memory" else RedisJobQueue(client, namespace=uuid.uuid4().hex)
    assert await queue.depth() == (0, 0.0)
    for job_id in ("j1", "j2", "j3"):
        await queue.enqueue(job_id)
    await asyncio.sleep(0.3)
    depth, age = await queue.depth()
    assert depth == 3 and 0.25 <= age < 5
    await queue.claim("w", block_s=0.1)
    assert (await queue.depth())[0] == 2


@needs_redis
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_store_updates_do_not_lose_a_concurrent_change(client: aioredis.Redis, kind: str) -> None:
    store = MemoryJobStore(3600) if kind == "memory" else RedisJobStore(client, namespace=uuid.uuid4().hex, retention_s=3600)
    record = JobRecord(id=new_job_id(), owner="o", route="generations", job={}, base_url="", created=time.time())
    await store.create(record)

    def bump(r: JobRecord) -> bool:
        r.attempts += 1
        return True

    await asyncio.gather(*(store.update(record.id, bump) for _ in range(25)))
    got = await store.get(record.id)
    assert got is not None and got.attempts == 25


@needs_redis
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_store_lists_an_owners_jobs_newest_first_with_a_cursor(client: aioredis.Redis, kind: str) -> None:
    store = MemoryJobStore(3600) if kind == "memory" else RedisJobStore(client, namespace=uuid.uuid4().hex, retention_s=3600)
    now = time.time()
    mine = []
    for i in range(7):
        record = JobRecord(id=new_job_id(now + i / 100), owner="me" if i != 3 else "other", route="generations", job={}, base_url="", created=now, status="succeeded" if i % 2 else "queued")
        await store.create(record)
        if record.owner == "me":
            mine.append(record.id)
    page, more = await store.list("me", status=None, limit=4, after=None)
    assert [r.id for r in page] == mine[::-1][:4] and more
    rest, more = await store.list("me", status=None, limit=4, after=page[-1].id)
    assert [r.id for r in rest] == mine[::-1][4:] and not more
    done, _ = await store.list("me", status="succeeded", limit=10, after=None)
    assert [r.id for r in done] == [mine[4], mine[1]]  # i = 5 and 1 (3 is another owner's)
    assert (await store.list("nobody", status=None, limit=10, after=None)) == ([], False)


@needs_redis
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_due_delivery_is_leased_to_one_taker_and_comes_back_when_the_lease_ends(client: aioredis.Redis, kind: str) -> None:
    schedule = MemoryDeliverySchedule() if kind == "memory" else RedisDeliverySchedule(client, namespace=uuid.uuid4().hex)
    await schedule.at("imgjob_c", time.time())
    await schedule.at("imgjob_later", time.time() + 60)
    first, second = await asyncio.gather(schedule.take(lease_s=0.3, count=10), schedule.take(lease_s=0.3, count=10))
    assert sorted(first + second) == ["imgjob_c"]
    await asyncio.sleep(0.35)
    assert await schedule.take(lease_s=0.3, count=10) == ["imgjob_c"]  # the taker died: due again
    await schedule.done("imgjob_c")
    await asyncio.sleep(0.35)
    assert await schedule.take(lease_s=0.3, count=10) == []


def test_job_ids_made_in_the_same_millisecond_sort_in_the_order_they_were_made() -> None:
    now = 1_750_000_000.123
    ids = [new_job_id(now) for _ in range(200)]
    assert sorted(ids) == ids and len(set(ids)) == len(ids)
