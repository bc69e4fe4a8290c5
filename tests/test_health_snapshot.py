"""Health off the request's path: the local copy (gateway/health/snapshot.py).

- An attempt reads nothing from Redis and writes its outcome in at most one
  round trip (counted with the store's round-trip hook and Redis's own
  INFO commandstats), tracker by tracker and through the whole app;
  successes close together share one.
- The one-second guarantee between replicas on one real Redis: by pub/sub
  (the refresh all but off), and by the refresh alone when pub/sub delivery
  is cut.
- While Redis is away the copy serves the last state it knew.
- A success does not make the next read go to the store, but a failure that
  opens the breaker here is seen here by the very next request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from litestar.testing import AsyncTestClient

from gateway.health import records as hr
from gateway.health.records import merge_pushed_back
from gateway.health.tracker import BreakerPolicy, HealthTracker
from gateway.health.view import BreakerState
from gateway.providers.base import FailureClass, ProviderError
from gateway.state import MemoryStore, ResilientStore
from gateway.state.base import StateStore
from gateway.state.redis import RedisStore
from tests.gateway_support import ENV, FakeAdapter, install_fakes, make_app
from tests.redis_server import RedisServer, redis_available

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
F = FailureClass
POLICY = BreakerPolicy(window_s=60, min_requests=4, failure_rate=0.5, consecutive_failures=3, cooldown_s=5, cooldown_max_s=60)
NEVER_OPENS = POLICY.model_copy(update={"consecutive_failures": 0, "min_requests": 10_000})
NAMES = {"x": "fal", "y": "fal"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


OUTCOMES: dict[str, Callable[[HealthTracker, object], object]] = {
    "success": lambda t, a: t.record_success("x", 0.4, a),
    "failed": lambda t, a: t.record_failure("x", ProviderError(F.FAILED, "HTTP 500", status=500), 0.4, a),
    "timeout": lambda t, a: t.record_failure("x", ProviderError(F.UNKNOWN_OUTCOME, "timed out"), 30.0, a),
    "rejected": lambda t, a: t.record_failure("x", ProviderError(F.REJECTED, "HTTP 422", status=422), 0.1, a),
    "rate_limited": lambda t, a: t.record_failure("x", ProviderError(F.REFUSED, "HTTP 429", status=429, retry_after=0.5), 0.1, a),
}


async def subscribed(trips: Counter[str]) -> None:
    deadline = time.monotonic() + 2
    while not trips["subscribe"]:
        assert time.monotonic() < deadline, "the health channel subscription never came up"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("outcome", "commands_at_most"),
    [
        ("success", 6),  # INCRBY+PEXPIRE (window), SET (in a row), LPUSH+LTRIM+PEXPIRE (latency)
        ("failed", 6),  # SET (last error), INCRBY+PEXPIRE twice, MGET (the window, read back for the open decision)
        ("timeout", 9),  # the same and its latency sample
        ("rejected", 1),  # SET (last error): says nothing about health
        ("rate_limited", 5),  # SET, EVAL (raise the parking; its GET and SET count too), PUBLISH
    ],
)
@needs_redis
async def test_an_attempt_reads_nothing_and_writes_its_outcome_in_one_round_trip(redis_server, outcome: str, commands_at_most: int) -> None:
    store = ResilientStore(RedisStore.from_url(redis_server.url, namespace=f"trips-{uuid.uuid4().hex[:8]}"), merge=merge_pushed_back)
    trips: Counter[str] = Counter()
    store.count_round_trips(lambda op: trips.update([op]))
    admin = RedisStore.from_url(redis_server.url)
    clock = FakeClock()
    tracker = HealthTracker(store, {"x": NEVER_OPENS, "y": NEVER_OPENS}, NAMES, clock=clock, refresh_s=30)  # no refresh during the run
    await tracker.start()
    try:
        await subscribed(trips)
        trips.clear()
        before = await admin._client.info("commandstats")
        for _ in range(20):
            await tracker.views(NAMES)
            admission = await tracker.acquire("x")
            assert admission is not None
            await OUTCOMES[outcome](tracker, admission)
            clock.now += 1  # past a parking
        await tracker.close()  # successes still waiting are written
        after = await admin._client.info("commandstats")
        assert set(trips) == {"batch_write"}, "a read on the request's path"
        assert 1 <= trips["batch_write"] <= 20, "more than one write round trip per attempt"
        if outcome != "success":
            assert trips["batch_write"] == 20
        window = (await tracker.describe(["x"]))["x"]["window"]
        assert window["requests"] == (0 if outcome in ("rejected", "rate_limited") else 20)
        handshakes = ("cmdstat_info", "cmdstat_hello", "cmdstat_client", "cmdstat_ping")  # a connection's own, not the attempt's
        calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after if not k.startswith(handshakes)}
        assert sum(calls.values()) <= 20 * commands_at_most, calls
    finally:
        await tracker.close()
        await store.close()
        await admin.close()


@needs_redis
async def test_through_the_gateway_a_request_costs_one_round_trip_to_redis(redis_server) -> None:
    env = {**ENV, "REDIS_URL": redis_server.url, "KLEIN_STATE_NAMESPACE": f"gw-{uuid.uuid4().hex[:8]}"}
    app = make_app(env=env)
    install_fakes(app, {n: FakeAdapter(n) for n in ("local", "replicate", "fal", "empiriolabs", "runflow")})
    metrics = app.state.gateway.metrics

    def trips() -> dict[str, float]:
        return {s.labels["op"]: s.value for family in metrics.state_round_trips.collect() for s in family.samples if s.name.endswith("_total")}

    async with AsyncTestClient(app) as client:
        before, started = trips(), time.monotonic()
        for _ in range(20):
            resp = await client.post("/v1/images/generations", json={"prompt": "a lighthouse", "size": "1024x1024", "response_format": "b64_json"})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-klein-attempts"] == "1"
        elapsed, after = time.monotonic() - started, trips()
    spent = {op: after[op] - before.get(op, 0.0) for op in after if after[op] != before.get(op, 0.0)}
    refreshes = spent.pop("batch_read", 0.0)
    spent.pop("subscribe", None)  # the health channel's, once
    assert set(spent) == {"batch_write"}, "a read round trip on the request's path"
    assert 1 <= spent["batch_write"] <= 20, "more than one write round trip per request"
    assert refreshes <= elapsed / 0.25 + 2  # the background refresh, at most one per interval


@needs_redis
async def test_successes_close_together_share_a_write_and_a_failure_carries_those_waiting(redis_server) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=f"late-{uuid.uuid4().hex[:8]}")
    trips: Counter[str] = Counter()
    store.count_round_trips(lambda op: trips.update([op]))
    tracker = HealthTracker(store, {"x": NEVER_OPENS}, NAMES, refresh_s=30, write_delay_s=0.3)
    await tracker.start()
    try:
        await subscribed(trips)
        trips.clear()
        for latency in (0.1, 0.2, 0.3, 0.4):
            await tracker.record_success("x", latency)
        assert trips == Counter() and (await tracker.views(NAMES))["x"].latency_p50_s == 0.2  # seen here at once, not yet written
        await tracker.record_failure("x", ProviderError(F.FAILED, "HTTP 500", status=500))
        assert trips == Counter({"batch_write": 1})  # the failure's batch carried the four successes
        for _ in range(3):
            await tracker.record_success("x", 0.5)
        await asyncio.sleep(0.5)
        assert trips == Counter({"batch_write": 2})  # three successes, one write, at most write_delay_s later
        described = (await tracker.describe(["x"]))["x"]
        assert described["window"] == {"seconds": 60, "requests": 8, "failures": 1} and described["latency_samples"] == 7
        assert described["failures_in_row"] == 0
    finally:
        await tracker.close()
        await store.close()


# ---- the one-second guarantee between replicas ---------------------------------------


class Deaf(ResilientStore):
    """Subscribed, but every message is lost on the way."""

    async def listen(self, channel: str, on_message: Callable[[str], None]) -> None:
        await self.primary.listen(channel, lambda _message: None)


async def routes_away_within(tracker: HealthTracker, timeout_s: float) -> float:
    """How long until `tracker` keeps requests off x (asserting within `timeout_s`)."""
    started = time.monotonic()
    while (await tracker.views(NAMES))["x"].available or await tracker.acquire("x") is not None:
        assert time.monotonic() - started < timeout_s, f"still routing to x after {timeout_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("how", "store_class", "refresh_s"),
    [
        pytest.param("pub/sub", ResilientStore, 30.0, id="by-pub-sub-refresh-all-but-off"),
        pytest.param("refresh", Deaf, 0.25, id="by-refresh-pub-sub-cut"),
    ],
)
@needs_redis
async def test_a_breaker_opened_on_one_gateway_keeps_the_other_off_it_within_a_second(redis_server, how: str, store_class: type[ResilientStore], refresh_s: float) -> None:
    ns = f"second-{uuid.uuid4().hex[:8]}"
    a_store, b_store = ResilientStore(RedisStore.from_url(redis_server.url, namespace=ns), merge=merge_pushed_back), store_class(RedisStore.from_url(redis_server.url, namespace=ns))
    trips: Counter[str] = Counter()
    b_store.count_round_trips(lambda op: trips.update([op]))
    a = HealthTracker(a_store, {"x": POLICY}, NAMES)
    b = HealthTracker(b_store, {"x": POLICY}, NAMES, refresh_s=refresh_s)
    await a.start()
    await b.start()
    try:
        await subscribed(trips)
        assert (await b.views(NAMES))["x"].available
        for _ in range(3):
            await a.record_failure("x", ProviderError(F.FAILED, "HTTP 500", status=500))
        assert not (await a.views(NAMES))["x"].available
        took = await routes_away_within(b, 1.0)
        if how == "pub/sub":
            assert b.local.messages >= 1 and took < 0.5
        else:
            assert b.local.messages == 0
        assert (await b.views(NAMES))["x"].state is BreakerState.OPEN and (await b.views(NAMES))["y"].available
    finally:
        for t in (a, b):
            await t.close()
        for s in (a_store, b_store):
            await s.close()


@needs_redis
async def test_a_parking_and_a_credentials_mark_reach_the_other_gateway_by_pub_sub(redis_server) -> None:
    ns = f"park-{uuid.uuid4().hex[:8]}"
    a_store, b_store = (ResilientStore(RedisStore.from_url(redis_server.url, namespace=ns), merge=merge_pushed_back) for _ in range(2))
    trips: Counter[str] = Counter()
    b_store.count_round_trips(lambda op: trips.update([op]))
    a, b = HealthTracker(a_store, {}, NAMES), HealthTracker(b_store, {}, NAMES, refresh_s=30)
    await a.start()
    await b.start()
    try:
        await subscribed(trips)
        await a.record_failure("x", ProviderError(F.REFUSED, "HTTP 429", status=429, retry_after=30))
        await a.record_failure("y", ProviderError(F.REFUSED, "HTTP 401", status=401, credentials_invalid=True))
        deadline = time.monotonic() + 1
        while b.local.messages < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        views = await b.views(NAMES)
        assert views["x"].parked_for_s > 25 and views["y"].credentials_invalid
    finally:
        for t in (a, b):
            await t.close()
        for s in (a_store, b_store):
            await s.close()


# ---- a Redis outage ---------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [pytest.param(False, id="bare-redis-store"), pytest.param(True, id="resilient-store")])
@needs_redis
async def test_the_copy_serves_the_last_known_state_while_redis_is_away(wrapped: bool) -> None:
    with RedisServer() as server:
        writer = RedisStore.from_url(server.url, namespace="out")
        reader: StateStore = RedisStore.from_url(server.url, namespace="out")
        if wrapped:
            reader = ResilientStore(reader, MemoryStore(), retry_interval_s=0.2, merge=merge_pushed_back)
        a = HealthTracker(writer, {"x": POLICY}, NAMES)
        b = HealthTracker(reader, {"x": POLICY}, NAMES, refresh_s=0.05)
        await b.start()
        try:
            await a.record_success("y", 0.7)
            for _ in range(3):
                await a.record_failure("x", ProviderError(F.FAILED, "HTTP 500", status=500))
            await a.record_failure("y", ProviderError(F.REFUSED, "HTTP 429", status=429, retry_after=60))
            await routes_away_within(b, 1.0)
            await asyncio.sleep(0.2)  # a refresh after the parking
            server.stop()
            await asyncio.sleep(0.5)  # refreshes fail (or fall back to memory) meanwhile
            views = await b.views(NAMES)
            assert views["x"].state is BreakerState.OPEN and await b.acquire("x") is None
            assert views["y"].parked_for_s > 55 and await b.acquire("y") is None
            if not wrapped:  # nothing to fall back to: the copy itself is all there is
                assert views["y"].latency_p50_s == 0.7
        finally:
            await b.close()
            await writer.close()
            await reader.close()


# ---- what this process records ------------------------------------------------------


async def test_a_success_reads_nothing_back_but_a_failure_that_opens_is_seen_here_at_once(state_store: StateStore) -> None:
    tracker = HealthTracker(state_store, {"x": POLICY}, NAMES, refresh_s=60)
    await tracker.start()
    try:
        # Written behind the copy's back (no message): only a read of the store would see it.
        await state_store.set(hr.key("x", "park"), repr(time.time() + 60), ttl_s=60)
        for _ in range(5):
            await tracker.record_success("x", 0.3)
            assert (await tracker.views(NAMES))["x"].parked_for_s == 0, "a success made the next read go to the store"
        for _ in range(3):
            await tracker.record_failure("x", ProviderError(F.FAILED, "HTTP 500", status=500))
        view = (await tracker.views(NAMES))["x"]
        assert view.state is BreakerState.OPEN and not view.available
        assert view.latency_p50_s == 0.3 and view.error_rate == pytest.approx(3 / 8)
        assert await tracker.acquire("x") is None
    finally:
        await tracker.close()


async def test_two_trackers_on_one_memory_store_share_transitions_at_once() -> None:
    store = MemoryStore()
    a, b = HealthTracker(store, {"x": POLICY}, NAMES, refresh_s=60), HealthTracker(store, {"x": POLICY}, NAMES, refresh_s=60)
    await a.start()
    await b.start()
    try:
        for _ in range(3):
            await a.record_failure("x", ProviderError(F.FAILED, "HTTP 500", status=500))
        assert await b.acquire("x") is None
    finally:
        await a.close()
        await b.close()


# ---- the copy's own rules ---------------------------------------------------------------

from gateway.health.breaker import BreakerRecord  # noqa: E402 - beside the tests that use it
from gateway.health.snapshot import LocalHealth, message  # noqa: E402 - beside the tests that use it

OPEN_V5 = BreakerRecord(state=BreakerState.OPEN, since=1000.0, cooldown_s=5.0, version=5).encode()
CLOSED_V6 = BreakerRecord(state=BreakerState.CLOSED, since=1010.0, gen=1, version=6, closed_at=1010.0).encode()


def local_over(store: StateStore) -> LocalHealth:
    return LocalHealth(lambda: store, lambda _n: 60.0, lambda _n: 10, names=["x"], refresh_s=60, clock=lambda: 1_700_000_000.0)


@pytest.mark.parametrize(
    ("held", "arrives", "kept"),
    [
        pytest.param(None, OPEN_V5, OPEN_V5, id="first-record-taken"),
        pytest.param(OPEN_V5, CLOSED_V6, CLOSED_V6, id="newer-version-taken"),
        pytest.param(CLOSED_V6, OPEN_V5, CLOSED_V6, id="older-message-arriving-late-ignored"),
        pytest.param(OPEN_V5, OPEN_V5, OPEN_V5, id="same-record-no-change"),
    ],
)
def test_a_breaker_message_is_taken_only_when_newer(held: str | None, arrives: str, kept: str) -> None:
    local = local_over(MemoryStore())
    if held is not None:
        local.apply_record("x", held)
    local.on_message(message("x", "breaker", arrives))
    local.on_message("not json")  # dropped, harmlessly
    assert local.entry("x").raw_record == kept


class HeldRead(MemoryStore):
    """A store whose reads wait for `go` once `hold` is set, answering what was there when they began."""

    def __init__(self) -> None:
        super().__init__()
        self.hold, self.go, self.began = False, asyncio.Event(), asyncio.Event()

    async def batch(self, ops):
        answers = await super().batch(ops)
        if self.hold:
            self.began.set()
            await self.go.wait()
        return answers


async def test_a_refresh_under_way_never_undoes_what_was_learned_meanwhile() -> None:
    store = HeldRead()
    await store.set(hr.key("x", "breaker"), OPEN_V5, ttl_s=60)
    local = local_over(store)
    await local.refresh()
    store.hold = True
    reading = asyncio.create_task(local.refresh())
    await store.began.wait()  # the read has answered OPEN_V5 and waits
    local.on_message(message("x", "breaker", CLOSED_V6))  # closed elsewhere meanwhile
    local.on_message(message("x", "park", "1700000100.0"))
    store.go.set()
    await reading
    e = local.entry("x")
    assert e.raw_record == CLOSED_V6 and e.parked_until == 1700000100.0
    store.hold = False
    await local.refresh()  # nothing learned during this one: the store's word holds again
    assert local.entry("x").raw_record == OPEN_V5 and local.entry("x").parked_until == 0.0


class SwallowsCancel(MemoryStore):
    """A store whose subscription, like a client library closing its
    connection, turns the first cancel into a connection error."""

    async def listen(self, channel: str, on_message: Callable[[str], None]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            raise ConnectionError("connection closed while unsubscribing") from None


async def test_closing_the_health_copy_ends_even_when_its_subscription_swallows_the_cancel() -> None:
    tracker = HealthTracker(SwallowsCancel(), {"x": NEVER_OPENS}, NAMES, refresh_s=0.05)
    await tracker.start()
    tasks = list(tracker.local._tasks)
    started = time.monotonic()
    await asyncio.wait_for(tracker.close(), timeout=5)
    await asyncio.sleep(1.1)  # the listen loop's pause before it would resubscribe
    assert time.monotonic() - started < 5
    assert all(t.done() for t in tasks), "a background loop outlived close()"
