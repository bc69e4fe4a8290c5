"""Breaker guarantees on the unhappy path: trial leases, outages, retried writes.

- A half-open trial lease belongs to the request that took it: outcomes of
  other requests on that backend never free it, across two gateway
  instances sharing one real Redis (as trackers, and as whole apps).
- A breaker opened while Redis was down survives Redis's return, although
  Redis still holds the older closed record (real redis-server, its data
  saved, stopped and restarted on the same port).
- A Redis write that is not idempotent (INCRBY) is never sent twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.health.breaker import BreakerRecord
from gateway.health.records import merge_pushed_back
from gateway.health.tracker import BreakerPolicy, HealthTracker
from gateway.health.view import BreakerState
from gateway.providers.base import FailureClass, ProviderError
from gateway.state import MemoryStore, ResilientStore
from gateway.state.base import StateStore
from gateway.state.redis import RedisStore
from tests.gateway_support import (
    ENV,
    FakeAdapter,
    ServerThread,
    install_fakes,
    make_app,
)
from tests.redis_server import RedisServer, redis_available

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
F = FailureClass
POLICY = BreakerPolicy(window_s=60, min_requests=4, consecutive_failures=3, cooldown_s=5, cooldown_max_s=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def failure(cls: FailureClass, status: int) -> ProviderError:
    return ProviderError(cls, f"HTTP {status}", status=status)


async def half_open(tracker: HealthTracker, clock: Clock) -> None:
    for _ in range(3):
        await tracker.record_failure("b", failure(F.FAILED, 500))
    clock.now += POLICY.cooldown_s
    assert (await tracker.views(["b"]))["b"].state is BreakerState.HALF_OPEN


async def seen_within(tracker: HealthTracker, state: BreakerState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (await tracker.views(["b"]))["b"].state is not state:
        assert time.monotonic() < deadline, f"not {state} within {timeout_s} s"
        await asyncio.sleep(0.01)


# Outcomes that say nothing about the backend's health: before trial leases
# carried a token, each of them freed whichever lease was on top.
UNCOUNTED = [
    pytest.param(failure(F.REJECTED, 422), id="422-rejected"),
    pytest.param(ProviderError(F.REFUSED, "HTTP 429", status=429, retry_after=0), id="429-no-park"),
    pytest.param(failure(F.CONTENT_FILTERED, 200), id="content-filtered"),
]


@pytest.mark.parametrize("outcome", UNCOUNTED)
async def test_an_outcome_of_another_request_never_frees_the_running_trials_lease(state_store: StateStore, outcome: ProviderError) -> None:
    clock = Clock()
    tracker = HealthTracker(state_store, {"b": POLICY}, {"b": "fal"}, clock=clock)
    early = await tracker.acquire("b")  # admitted while the breaker was still closed
    assert early is not None and early.lease is None
    await half_open(tracker, clock)
    trial = await tracker.acquire("b")
    assert trial is not None and trial.lease is not None
    await tracker.record_failure("b", outcome, admission=early)  # the early request's answer arrives now
    await tracker.record_failure("b", outcome)  # and one recorded with no admission at all
    assert await tracker.acquire("b") is None, "a second trial got in while the first still runs"
    await tracker.record_failure("b", outcome, admission=trial)  # the trial's own uncounted answer frees it
    assert await tracker.acquire("b") is not None


async def test_giving_a_lease_back_twice_never_frees_the_next_holders(state_store: StateStore) -> None:
    clock = Clock()
    tracker = HealthTracker(state_store, {"b": POLICY}, {"b": "fal"}, clock=clock)
    await half_open(tracker, clock)
    first = await tracker.acquire("b")
    await tracker.release(first)
    second = await tracker.acquire("b")
    assert second is not None
    await tracker.release(first)  # a late second release of the first lease
    assert await tracker.acquire("b") is None


@needs_redis
async def test_two_gateway_instances_on_one_redis_run_exactly_one_trial(redis_server) -> None:
    """Two trackers, each with its own Redis connections (as two gateway
    processes have), race waves of requests at a half-open backend while
    requests admitted before it opened report uncounted outcomes."""
    ns = f"trial-{uuid.uuid4().hex[:8]}"
    clock = Clock()
    stores = [ResilientStore(RedisStore.from_url(redis_server.url, namespace=ns), merge=merge_pushed_back) for _ in range(2)]
    a, b = (HealthTracker(s, {"b": POLICY}, {"b": "fal"}, clock=clock) for s in stores)
    for t in (a, b):
        await t.start()  # as in a gateway: local copies, refreshed and fed by pub/sub
    try:
        early = [await t.acquire("b") for t in (a, b) for _ in range(4)]
        await half_open(a, clock)
        # B admits from its local copy while it still says closed (not trials: the
        # guarantee is that it learns within a second), so the race starts once it has.
        await seen_within(b, BreakerState.HALF_OPEN, 1.0)
        first_wave = await asyncio.gather(*(t.acquire("b") for t in (a, b) for _ in range(8)))
        trials = [x for x in first_wave if x is not None]
        assert len(trials) == 1
        for i, admission in enumerate(early):  # their 422s and 429s arrive while the trial runs
            tracker = (a, b)[i % 2]
            outcome = failure(F.REJECTED, 422) if i % 2 else ProviderError(F.REFUSED, "HTTP 429", status=429, retry_after=0)
            await asyncio.gather(tracker.record_failure("b", outcome, admission=admission), tracker.acquire("b"))
        later_wave = await asyncio.gather(*(t.acquire("b") for t in (a, b) for _ in range(8)))
        assert all(x is None for x in later_wave), "a second trial got in while the first still runs"
        await a.record_success("b", 0.5, admission=trials[0])
        await seen_within(b, BreakerState.CLOSED, 1.0)
    finally:
        for t in (a, b):
            await t.close()
        for s in stores:
            await s.close()


# ---- merging back what was learned during an outage ---------------------------

OLD_CLOSED = BreakerRecord(state=BreakerState.CLOSED, since=1000.0, gen=3, version=7, closed_at=1000.0)
OPENED_ALONE = BreakerRecord(state=BreakerState.OPEN, since=2000.0, cooldown_s=5.0, gen=3, version=8)
REOPENED_ELSEWHERE = BreakerRecord(state=BreakerState.CLOSED, since=2500.0, gen=4, version=9, closed_at=2500.0)


@pytest.mark.parametrize(
    ("key", "mine", "theirs", "want"),
    [
        pytest.param("health:fal:breaker", OPENED_ALONE.encode(), None, OPENED_ALONE.encode(), id="breaker-absent"),
        pytest.param("health:fal:breaker", OPENED_ALONE.encode(), OLD_CLOSED.encode(), "open", id="breaker-newer-wins"),
        pytest.param("health:fal:breaker", OPENED_ALONE.encode(), REOPENED_ELSEWHERE.encode(), None, id="breaker-older-loses"),
        pytest.param("health:fal:park", "2100.0", "2050.0", "2100.0", id="park-later-deadline-wins"),
        pytest.param("health:fal:park", "2050.0", "2100.0", None, id="park-earlier-deadline-loses"),
        pytest.param("health:fal:last_error", '{"at": 20}', '{"at": 10}', '{"at": 20}', id="note-newer-wins"),
        pytest.param("health:fal:creds", "2000.0", "1000.0", None, id="other-keys-never-overwrite"),
        pytest.param("health:fal:creds", "2000.0", None, "2000.0", id="other-keys-set-where-absent"),
    ],
)
def test_merge_rule_table(key: str, mine: str, theirs: str | None, want: str | None) -> None:
    merged = merge_pushed_back(key, mine, theirs)
    if want == "open":
        record = BreakerRecord.decode(merged)
        assert record.state is BreakerState.OPEN and record.since == OPENED_ALONE.since
        assert record.version > OLD_CLOSED.version  # every reader sees a new record
    else:
        assert merged == want


@needs_redis
async def test_a_breaker_opened_while_redis_was_down_survives_its_return_over_the_older_record() -> None:
    """Redis holds a closed breaker record and a short parking from before the
    outage (saved, so the restarted server loads them); during the outage one
    gateway opens the breaker and parks for longer in memory. After Redis is
    back, another gateway reading Redis sees the breaker open and the later
    parking deadline."""
    clock = Clock()
    with RedisServer() as server:
        ns = f"resync-{uuid.uuid4().hex[:8]}"
        store = ResilientStore(RedisStore.from_url(server.url, namespace=ns), MemoryStore(), retry_interval_s=0.1, merge=merge_pushed_back)
        other = RedisStore.from_url(server.url, namespace=ns)
        tracker = HealthTracker(store, {"b": POLICY}, {"b": "fal"}, clock=clock)
        reader = HealthTracker(other, {"b": POLICY}, {"b": "fal"}, clock=clock)
        raw = aioredis.Redis.from_url(server.url)
        try:
            await tracker.record_success("b", 0.4)  # a closed record exists in Redis
            await tracker.record_failure("b", ProviderError(F.REFUSED, "HTTP 429", status=429, retry_after=2))
            await other.set("health:b:breaker", OLD_CLOSED.encode(), ttl_s=86_400)
            assert await raw.save()
            server.stop()
            clock.now += 1
            for _ in range(3):
                await tracker.record_failure("b", failure(F.FAILED, 500))
            await tracker.record_failure("b", ProviderError(F.REFUSED, "HTTP 503", status=503, retry_after=30))
            assert (await tracker.views(["b"]))["b"].state is BreakerState.OPEN
            assert await store.status() == "degraded"

            server.start()
            assert await other.get("health:b:breaker") == OLD_CLOSED.encode()  # the stale record is back
            deadline = time.monotonic() + 3.0
            while await store.status() != "ok":
                assert time.monotonic() < deadline, "the store did not see Redis return"
                await asyncio.sleep(0.05)
            await store.resynced()
            view = (await reader.views(["b"]))["b"]
            assert view.state is BreakerState.OPEN
            assert view.parked_for_s == pytest.approx(30, abs=0.5)
            assert await reader.acquire("b") is None
        finally:
            await raw.aclose()
            await other.close()
            await store.close()


# ---- writes that must never be sent twice ---------------------------------------


class ReplyCutter:
    """A loopback TCP proxy in front of Redis that, once armed, forwards the
    next command holding `trigger` to Redis and then drops the connection
    instead of the reply: the command ran, the client only sees its
    connection broken."""

    def __init__(self, upstream_port: int, trigger: bytes = b"INCRBY") -> None:
        self.upstream_port = upstream_port
        self.trigger = trigger
        self.armed = False
        self.cuts = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cut = asyncio.Event()

        async def up() -> None:
            while data := await client_r.read(65536):
                if self.armed and self.trigger in data.upper():
                    self.armed = False
                    cut.set()
                server_w.write(data)
                await server_w.drain()

        async def down() -> None:
            while data := await server_r.read(65536):
                if cut.is_set():
                    await asyncio.sleep(0.05)  # let the whole transaction run
                    self.cuts += 1
                    break
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()


@needs_redis
async def test_an_incr_whose_reply_was_lost_is_not_sent_again_so_it_counts_once(redis_server) -> None:
    ns = f"incr-{uuid.uuid4().hex[:8]}"
    proxy = ReplyCutter(redis_server.port)
    port = await proxy.start()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", namespace=ns)
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await store.incr("n", ttl_s=60) == 1
        proxy.armed = True
        with pytest.raises(Exception):  # noqa: B017 - the connection error's type is the client's
            await store.incr("n", ttl_s=60)
        assert proxy.cuts == 1
        assert await admin.get(f"klein:{ns}:n") == "2"  # it ran once, and only once
        assert await store.get("missing") is None  # reads still work (and may retry)
        assert await store.incr("n", ttl_s=60) == 3
    finally:
        await admin.aclose()
        await store.close()
        await proxy.close()


@needs_redis
async def test_a_batch_whose_reply_was_lost_is_not_sent_again_so_its_counter_counts_once(redis_server) -> None:
    from gateway.state.base import Op

    ns = f"batch-{uuid.uuid4().hex[:8]}"
    proxy = ReplyCutter(redis_server.port)
    port = await proxy.start()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", namespace=ns)
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    outcome = [Op.incr("n", ttl_s=60), Op.set("consec", "0", ttl_s=60), Op.append("lat", 0.5, keep=10, ttl_s=60)]
    try:
        assert (await store.batch(outcome))[0] == 1
        proxy.armed = True
        with pytest.raises(Exception):  # noqa: B017 - the connection error's type is the client's
            await store.batch(outcome)
        assert proxy.cuts == 1
        assert await admin.get(f"klein:{ns}:n") == "2"  # it ran once, and only once
        assert await admin.llen(f"klein:{ns}:lat") == 2
        assert (await store.batch(outcome))[0] == 3
    finally:
        await admin.aclose()
        await store.close()
        await proxy.close()


# ---- the same through two gateway apps sharing one Redis --------------------------


class ScriptedLocal:
    """A local adapter whose calls follow the prompt: "slow-reject" answers 422
    after 1 s (a request admitted while the breaker was still closed), "trial"
    succeeds after 2 s. Shared by both apps, so it sees every call."""

    kind = "fake"
    reports_live_price = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def generate(self, job, deadline):
        self.calls.append(job.prompt)
        if job.prompt == "slow-reject":
            await asyncio.sleep(1.0)
            raise ProviderError(F.REJECTED, "HTTP 422: unprocessable", status=422)
        await asyncio.sleep(2.0)
        return await FakeAdapter("local").generate(job, deadline)


@needs_redis
async def test_an_uncounted_422_during_a_trial_lets_no_second_trial_in_across_two_gateways() -> None:
    """Two gateway apps served on loopback, one Redis. A request admitted to
    the local backend while its breaker was closed answers 422 while the
    half-open trial runs on the same gateway; then requests on both gateways
    must still go around local until the trial reports."""
    local = ScriptedLocal()
    body = {"size": "1024x1024", "response_format": "b64_json"}
    with RedisServer() as server:
        apps = [make_app(env={**ENV, "REDIS_URL": server.url}) for _ in range(2)]
        for app in apps:
            install_fakes(app, {n: FakeAdapter(n) for n in ("replicate", "fal", "empiriolabs", "runflow")})
            app.state.gateway.fleet.backends["local"].adapter = local  # type: ignore[assignment]
        store = RedisStore.from_url(server.url, namespace="default")
        with ServerThread(apps[0]) as a, ServerThread(apps[1]) as b:
            async with httpx.AsyncClient(timeout=30) as client:

                def post(server: ServerThread, prompt: str) -> Any:
                    return client.post(f"{server.url}/v1/images/generations", json={**body, "prompt": prompt})

                early = asyncio.create_task(post(a, "slow-reject"))
                await asyncio.sleep(0.3)  # admitted while closed; now another replica's breaker opened and cooled down
                half_open = BreakerRecord(state=BreakerState.OPEN, since=time.time() - 3600, cooldown_s=5.0, version=41)
                await store.set("health:local:breaker", half_open.encode(), ttl_s=3600)
                # Written behind the gateways' backs (no pub/sub message): A's local copy would
                # take it within one refresh; GET /v1/backends makes A take it now.
                assert (await client.get(f"{a.url}/v1/backends")).status_code == 200
                trial = asyncio.create_task(post(a, "trial"))
                await asyncio.sleep(0.3)
                rejected = await early  # its 422 is recorded while the trial runs
                others = await asyncio.gather(*(post(s, "during") for s in (a, b, a, b)))
                served = await trial
        await store.close()
    assert rejected.status_code == 200 and rejected.headers["x-klein-backend"] == "replicate"  # local said 422; replicate took it
    assert served.status_code == 200 and served.headers["x-klein-backend"] == "local"
    assert [r.headers.get("x-klein-backend") for r in others] == ["replicate"] * 4
    assert local.calls == ["slow-reject", "trial"], "a second trial reached the half-open backend"


@needs_redis
async def test_a_trial_lease_whose_set_nx_reply_was_lost_is_still_held_by_its_taker(redis_server) -> None:
    """SET NX is not resent; the taker reads the slot back and finds its own
    token, so it runs the one trial and no other replica does."""
    ns = f"lostnx-{uuid.uuid4().hex[:8]}"
    proxy = ReplyCutter(redis_server.port, trigger=b"$2\r\nNX\r\n")
    port = await proxy.start()
    clock = Clock()
    cut = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", namespace=ns)
    direct = RedisStore.from_url(redis_server.url, namespace=ns)
    taker = HealthTracker(cut, {"b": POLICY}, {"b": "fal"}, clock=clock)
    other = HealthTracker(direct, {"b": POLICY}, {"b": "fal"}, clock=clock)
    try:
        await half_open(other, clock)
        proxy.armed = True
        trial = await taker.acquire("b")
        assert proxy.cuts == 1
        assert trial is not None and trial.lease is not None
        assert await other.acquire("b") is None
        await taker.release(trial)
        assert await other.acquire("b") is not None
    finally:
        await cut.close()
        await direct.close()
        await proxy.close()


class LeaseStoreDown(MemoryStore):
    """Reads work; taking a lease fails."""

    async def set_if_absent(self, key: str, value: str, *, ttl_s: float) -> bool:
        raise ConnectionError("down")


async def test_a_lease_that_cannot_be_taken_admits_no_trial() -> None:
    clock = Clock()
    tracker = HealthTracker(LeaseStoreDown(), {"b": POLICY}, {"b": "fal"}, clock=clock)
    assert await tracker.acquire("b") is not None  # closed: no lease needed
    await half_open(tracker, clock)
    assert all(a is None for a in await asyncio.gather(*(tracker.acquire("b") for _ in range(5))))
