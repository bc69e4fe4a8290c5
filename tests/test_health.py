"""Health policy and the shared circuit breaker, over memory and Redis stores."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from decimal import Decimal

import pytest

from gateway.health.records import merge_pushed_back
from gateway.health.tracker import BreakerPolicy, HealthEffect, HealthTracker, health_effect
from gateway.health.view import HEALTHY, BreakerState
from gateway.providers import adapter_class
from gateway.providers.base import FailureClass, ProbeResult, ProviderError
from gateway.state import MemoryStore, ResilientStore
from gateway.state.base import StateStore
from gateway.state.redis import RedisStore
from tests.redis_server import RedisServer, redis_available

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
F = FailureClass


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def err(failure: FailureClass, status: int | None = None, retry_after: float | None = None, creds: bool = False) -> ProviderError:
    return ProviderError(failure, f"failure {status}", status=status, retry_after=retry_after, credentials_invalid=creds)


POLICY = BreakerPolicy(window_s=60, min_requests=4, failure_rate=0.5, consecutive_failures=3, cooldown_s=5, cooldown_multiplier=2, cooldown_max_s=12)


def tracker_on(store: StateStore, clock: FakeClock, policy: BreakerPolicy = POLICY, kind: str = "fal") -> HealthTracker:
    return HealthTracker(store, {"b": policy}, {"b": kind}, clock=clock)


async def state(tracker: HealthTracker) -> BreakerState:
    return (await tracker.views(["b"]))["b"].state


async def open_it(tracker: HealthTracker, n: int = 3) -> None:
    for _ in range(n):
        await tracker.record_failure("b", err(F.FAILED, 500))


# ---- the policy table ---------------------------------------------------------

NONE = HealthEffect(False, None, False)
COUNT = HealthEffect(True, None, False)


@pytest.mark.parametrize(
    ("error", "kind", "effect"),
    [
        (err(F.REJECTED, 400), "fal", NONE),
        (err(F.REJECTED, 422), "local", NONE),
        (err(F.CONTENT_FILTERED), "replicate", NONE),
        (err(F.UNREACHABLE), "fal", COUNT),
        (err(F.UNREACHABLE), "local", COUNT),
        (err(F.FAILED, 500), "runflow", COUNT),
        (err(F.FAILED), "local", COUNT),
        (err(F.UNKNOWN_OUTCOME), "replicate", COUNT),
        (err(F.REFUSED, 429, retry_after=12), "fal", HealthEffect(False, 12, False)),
        (err(F.REFUSED, 429), "fal", HealthEffect(False, 5.0, False)),
        (err(F.REFUSED, 429, retry_after=0), "fal", HealthEffect(False, None, False)),
        (err(F.REFUSED, 429, retry_after=30), "local", NONE),
        (err(F.REFUSED, 503, retry_after=7), "replicate", HealthEffect(True, 7, False)),
        (err(F.REFUSED, 503), "local", HealthEffect(True, 5.0, False)),
        (err(F.REFUSED, 402), "fal", HealthEffect(True, 300.0, False)),
        (err(F.REFUSED, 402, retry_after=900), "fal", HealthEffect(True, 900, False)),
        (err(F.REFUSED, 401, creds=True), "fal", HealthEffect(False, None, True)),
        (err(F.REFUSED, 403), "empiriolabs", HealthEffect(False, None, True)),
        (err(F.REFUSED, 401), "local", HealthEffect(False, None, True)),
        (err(F.REFUSED, None, creds=True), "runflow", HealthEffect(False, None, True)),
        (err(F.REFUSED, None, retry_after=3), "runflow", HealthEffect(True, 3, False)),
    ],
)
def test_health_effect_table(error: ProviderError, kind: str, effect: HealthEffect) -> None:
    assert health_effect(error, reports_queue_wait=adapter_class(kind).reports_queue_wait) == effect


def test_health_effect_default_parkings_are_configurable() -> None:
    assert health_effect(err(F.REFUSED, 429), default_park_s=2).park_s == 2
    assert health_effect(err(F.REFUSED, 402), out_of_credit_park_s=60).park_s == 60


def test_breaker_policy_rejects_unknown_fields_and_inverted_cooldowns() -> None:
    with pytest.raises(ValueError, match="cooldown_max_s"):
        BreakerPolicy(cooldown_s=10, cooldown_max_s=5)
    with pytest.raises(ValueError, match="windw_s"):
        BreakerPolicy.model_validate({"windw_s": 10})


# ---- breaker transitions, over memory and Redis ----------------------------------


async def test_failure_rate_opens_only_once_the_minimum_count_is_reached(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, POLICY.model_copy(update={"consecutive_failures": 0}))
    for _ in range(3):
        await t.record_failure("b", err(F.FAILED, 500))
    assert await state(t) is BreakerState.CLOSED  # rate 1.0 but 3 < min_requests 4
    await t.record_success("b", 1.0)  # 4 requests, 3 failed
    assert await state(t) is BreakerState.CLOSED  # a success never opens
    await t.record_failure("b", err(F.FAILED, 500))  # 5 requests, 4 failed
    assert await state(t) is BreakerState.OPEN
    assert await t.acquire("b") is None


async def test_failure_rate_below_threshold_stays_closed(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock(), POLICY.model_copy(update={"consecutive_failures": 0}))
    for _ in range(3):
        await t.record_success("b", 1.0)
        await t.record_failure("b", err(F.FAILED, 500))
        await t.record_success("b", 1.0)
    view = (await t.views(["b"]))["b"]
    assert view.state is BreakerState.CLOSED
    assert view.error_rate == pytest.approx(1 / 3)


async def test_failures_outside_the_window_no_longer_count(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, POLICY.model_copy(update={"consecutive_failures": 0}))
    for _ in range(3):
        await t.record_failure("b", err(F.FAILED, 500))
    clock.advance(61)
    await t.record_success("b", 1.0)
    await t.record_failure("b", err(F.FAILED, 500))
    view = (await t.views(["b"]))["b"]
    assert view.state is BreakerState.CLOSED
    assert view.error_rate == pytest.approx(0.5)


async def test_consecutive_failures_open_and_a_success_between_resets_them(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock(), POLICY.model_copy(update={"min_requests": 100}))
    await open_it(t, 2)
    await t.record_success("b", 1.0)
    await open_it(t, 2)
    assert await state(t) is BreakerState.CLOSED
    await open_it(t, 1)
    assert await state(t) is BreakerState.OPEN


async def test_open_turns_half_open_when_the_cooldown_has_run(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    await open_it(t)
    clock.advance(4.9)
    assert await state(t) is BreakerState.OPEN
    clock.advance(0.1)
    assert await state(t) is BreakerState.HALF_OPEN


async def test_half_open_trial_success_closes_and_starts_a_fresh_window(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, POLICY.model_copy(update={"consecutive_failures": 0, "min_requests": 2}))
    await open_it(t, 2)
    clock.advance(5)
    assert await t.acquire("b") is not None
    await t.record_success("b", 1.0)
    assert await state(t) is BreakerState.CLOSED
    assert await t.acquire("b") is not None
    await t.record_failure("b", err(F.FAILED, 500))  # 1 of 2 in the new window: below the minimum
    assert await state(t) is BreakerState.CLOSED


async def test_half_open_trial_failure_reopens_with_a_grown_cooldown(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    await open_it(t)
    clock.advance(5)
    assert await t.acquire("b") is not None
    await t.record_failure("b", err(F.UNREACHABLE))
    clock.advance(9.9)
    assert await state(t) is BreakerState.OPEN
    clock.advance(0.1)
    assert await state(t) is BreakerState.HALF_OPEN
    assert (await t.describe(["b"]))["b"]["cooldown_s"] == 10


async def test_cooldown_grows_by_the_multiplier_and_caps_at_the_maximum(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    await open_it(t)
    seen = []
    for _ in range(4):
        seen.append((await t.describe(["b"]))["b"]["cooldown_s"])
        clock.advance(seen[-1])
        assert await t.acquire("b") is not None
        await t.record_failure("b", err(F.FAILED, 500))
    assert seen == [5, 10, 12, 12]


async def test_reopening_soon_after_closing_grows_the_cooldown(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    await open_it(t)
    clock.advance(5)
    await t.acquire("b")
    await t.record_success("b", 1.0)
    clock.advance(10)  # within one window of closing: flapping
    await open_it(t)
    assert (await t.describe(["b"]))["b"]["cooldown_s"] == 10
    clock.advance(10)
    await t.acquire("b")
    await t.record_success("b", 1.0)
    clock.advance(120)  # closed for longer than a window: a fresh start
    await open_it(t)
    assert (await t.describe(["b"]))["b"]["cooldown_s"] == 5


async def test_half_open_admits_one_trial_until_it_reports(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    await open_it(t)
    clock.advance(5)
    results = await asyncio.gather(*(t.acquire("b") for _ in range(10)))
    admitted = [a for a in results if a is not None]
    assert len(admitted) == 1
    await t.record_failure("b", err(F.REJECTED, 400), admission=admitted[0])  # says nothing about health: the lease returns
    assert await state(t) is BreakerState.HALF_OPEN
    assert await t.acquire("b") is not None
    assert await t.acquire("b") is None


async def test_a_trial_lease_whose_holder_never_reports_lapses(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, POLICY.model_copy(update={"trial_timeout_s": 30}))
    await open_it(t)
    clock.advance(5)
    assert await t.acquire("b") is not None
    clock.advance(29)
    assert await t.acquire("b") is None
    clock.advance(1)
    assert await t.acquire("b") is not None


async def test_half_open_max_trials_admits_that_many(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, POLICY.model_copy(update={"half_open_max_trials": 3}))
    await open_it(t)
    clock.advance(5)
    assert sum(a is not None for a in await asyncio.gather(*(t.acquire("b") for _ in range(10)))) == 3


async def test_retry_after_parks_the_backend_without_counting_and_expires(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    for _ in range(5):
        await t.record_failure("b", err(F.REFUSED, 429, retry_after=10))
    view = (await t.views(["b"]))["b"]
    assert view.parked_for_s == pytest.approx(10)
    assert view.state is BreakerState.CLOSED and view.error_rate == 0
    assert not view.available and view.why_unavailable.startswith("rate limited")
    assert await t.acquire("b") is None
    await t.record_failure("b", err(F.REFUSED, 429, retry_after=2))  # a shorter one does not shorten it
    clock.advance(9.9)
    assert await t.acquire("b") is None
    clock.advance(0.1)
    assert await t.acquire("b") is not None
    assert (await t.views(["b"]))["b"].parked_for_s == 0


async def test_local_429_neither_parks_nor_counts(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock(), kind="local")
    for _ in range(5):
        await t.record_failure("b", err(F.REFUSED, 429, retry_after=30))
    assert (await t.views(["b"]))["b"] == HEALTHY
    assert await t.acquire("b") is not None


async def test_401_marks_credentials_invalid_until_a_good_probe(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock())
    await t.record_failure("b", err(F.REFUSED, 401, creds=True))
    view = (await t.views(["b"]))["b"]
    assert view.credentials_invalid and view.why_unavailable == "credentials rejected"
    assert view.state is BreakerState.CLOSED
    assert await t.acquire("b") is None
    await t.record_probe("b", ProbeResult(ok=False, detail="HTTP 401"))
    assert (await t.views(["b"]))["b"].credentials_invalid
    await t.record_probe("b", ProbeResult(ok=True))
    assert not (await t.views(["b"]))["b"].credentials_invalid
    assert await t.acquire("b") is not None


async def test_latency_quantiles_come_from_recent_successes(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock())
    for latency in range(1, 101):
        await t.record_success("b", latency / 10)
    await t.record_failure("b", err(F.FAILED, 500), latency_s=99.0)  # not a timeout: no sample
    view = (await t.views(["b"]))["b"]
    assert view.latency_p50_s == pytest.approx(5.0)
    assert view.latency_p95_s == pytest.approx(9.5)


async def test_state_changes_reach_the_callback_once_each(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    seen: list[tuple[str, BreakerState]] = []
    t.on_state_change(lambda name, s: seen.append((name, s)))
    await t.views(["b"])
    await open_it(t)
    await t.views(["b"])
    clock.advance(5)
    await t.acquire("b")
    await t.record_success("b", 1.0)
    assert [s for _, s in seen] == [BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert {n for n, _ in seen} == {"b"}


async def test_describe_is_json_and_keeps_secrets_and_urls_out(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock())
    error = ProviderError(F.FAILED, "HTTP 500 at https://queue.fal.run/x?key=abc with Authorization: Key sk-123")
    await t.record_failure("b", error)
    await t.record_success("b", 2.0)
    described = (await t.describe(["b"]))["b"]
    text = json.dumps(described)
    assert "sk-123" not in text and "fal.run" not in text
    assert described["state"] == "closed" and described["window"] == {"seconds": 60, "requests": 2, "failures": 1}
    assert described["last_error"]["class"] == "failed"
    assert described["latency_p50_s"] == 2.0


# ---- probes' effects on the breaker -------------------------------------------------


async def test_a_good_probe_ends_the_cooldown_early_but_never_closes(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, POLICY.model_copy(update={"cooldown_max_s": 300}))
    await open_it(t)
    clock.advance(5)
    await t.acquire("b")
    await t.record_failure("b", err(F.FAILED, 500))  # re-opened for 10 s
    clock.advance(4)
    await t.record_probe("b", ProbeResult(ok=True))
    assert await state(t) is BreakerState.OPEN  # open less than cooldown_s: no shortcut yet
    clock.advance(1)
    await t.record_probe("b", ProbeResult(ok=False))
    assert await state(t) is BreakerState.OPEN  # a failed probe keeps it open
    await t.record_probe("b", ProbeResult(ok=True))
    assert await state(t) is BreakerState.HALF_OPEN
    await t.record_probe("b", ProbeResult(ok=True))
    assert await state(t) is BreakerState.HALF_OPEN  # probes never close
    assert await t.acquire("b") is not None


async def test_failed_probes_in_a_row_open_a_closed_breaker(state_store: StateStore) -> None:
    t = tracker_on(state_store, FakeClock())
    await t.record_probe("b", ProbeResult(ok=False))
    await t.record_probe("b", ProbeResult(ok=False))
    await t.record_probe("b", ProbeResult(ok=True))
    await t.record_probe("b", ProbeResult(ok=False))
    await t.record_probe("b", ProbeResult(ok=False))
    assert await state(t) is BreakerState.CLOSED
    await t.record_probe("b", ProbeResult(ok=False))
    assert await state(t) is BreakerState.OPEN


async def test_probe_live_figures_reach_the_view_and_go_stale(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock, kind="local")
    live = {"estimated_wait_s": 1.5, "cost": {"marginal_usd_per_image": 0.000415}, "device": "cuda"}
    await t.record_probe("b", ProbeResult(ok=True, live=live))
    view = (await t.views(["b"]))["b"]
    assert view.estimated_wait_s == 1.5
    assert view.live_usd_per_image == Decimal("0.000415")
    clock.advance(t.live_ttl_s + 1)
    view = (await t.views(["b"]))["b"]
    assert view.estimated_wait_s is None and view.live_usd_per_image is None


# ---- replicas sharing Redis ---------------------------------------------------------


@needs_redis
async def test_a_breaker_opened_by_one_replica_is_seen_by_another_within_a_second(redis_server) -> None:
    ns = f"rep-{uuid.uuid4().hex[:8]}"
    one, two = (RedisStore.from_url(redis_server.url, namespace=ns) for _ in range(2))
    a, b = HealthTracker(one, {"b": POLICY}, {"b": "fal"}), HealthTracker(two, {"b": POLICY}, {"b": "fal"})
    try:
        await open_it(a)
        opened_at = time.monotonic()
        while (await b.views(["b"]))["b"].state is not BreakerState.OPEN:
            assert time.monotonic() - opened_at < 1.0
            await asyncio.sleep(0.01)
        assert await b.acquire("b") is None
    finally:
        await one.close()
        await two.close()


@needs_redis
async def test_exactly_one_replica_takes_the_half_open_trial(redis_server) -> None:
    ns = f"trial-{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    stores = [RedisStore.from_url(redis_server.url, namespace=ns) for _ in range(3)]
    replicas = [HealthTracker(s, {"b": POLICY}, {"b": "fal"}, clock=clock) for s in stores]
    try:
        await open_it(replicas[0])
        clock.advance(5)
        results = await asyncio.gather(*(r.acquire("b") for r in replicas for _ in range(10)))
        assert sum(a is not None for a in results) == 1
    finally:
        for s in stores:
            await s.close()


@needs_redis
async def test_replicas_carry_on_through_a_redis_outage_and_share_again_after(redis_server) -> None:
    with RedisServer() as server:
        a_store = ResilientStore(RedisStore.from_url(server.url, namespace="o"), MemoryStore(), retry_interval_s=0.2, merge=merge_pushed_back)
        b_store = ResilientStore(RedisStore.from_url(server.url, namespace="o"), MemoryStore(), retry_interval_s=0.2, merge=merge_pushed_back)
        a = HealthTracker(a_store, {}, {"x": "fal", "y": "fal"})
        b = HealthTracker(b_store, {}, {"x": "fal", "y": "fal"})
        try:
            server.stop()
            for _ in range(3):  # every call works; the breaker opens in A's memory
                assert await a.acquire("x") is not None
                await a.record_failure("x", err(F.FAILED, 500))
            assert (await a.views(["x"]))["x"].state is BreakerState.OPEN
            assert await a_store.status() == "degraded"

            server.start()
            deadline = time.monotonic() + 3.0
            while await a_store.status() != "ok" or await b_store.status() != "ok":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await a.record_failure("y", err(F.REFUSED, 429, retry_after=30))
            assert (await b.views(["y"]))["y"].parked_for_s > 25  # shared again
            # A pushes back what it learned alone; B's local copy takes it within one refresh.
            seen_by = time.monotonic() + 1.0
            while (await b.views(["x"]))["x"].state is not BreakerState.OPEN:
                assert time.monotonic() < seen_by, "B never saw the breaker A opened during the outage"
                await asyncio.sleep(0.02)
        finally:
            await a_store.close()
            await b_store.close()


class DeadStore(MemoryStore):
    """A store whose every operation fails (a bare Redis store, unwrapped, that died)."""

    def __getattribute__(self, name: str):
        if name in {"get", "get_many", "set", "set_if_absent", "compare_and_set", "incr", "delete", "append_sample", "samples"}:

            async def fail(*args, **kwargs):
                raise ConnectionError("gone")

            return fail
        return super().__getattribute__(name)


async def test_a_failing_store_never_fails_a_request() -> None:
    t = HealthTracker(DeadStore(), {}, {"b": "fal"})
    assert await t.views(["b"]) == {"b": HEALTHY}
    assert await t.acquire("b") is not None
    await t.record_success("b", 1.0)
    await t.record_failure("b", err(F.FAILED, 500))
    await t.record_probe("b", ProbeResult(ok=True, live={"estimated_wait_s": 1}))
    assert (await t.describe(["b"]))["b"]["state"] == "unknown"


async def test_release_returns_a_trial_lease_for_an_attempt_never_sent(state_store: StateStore) -> None:
    clock = FakeClock()
    t = tracker_on(state_store, clock)
    await open_it(t)
    clock.advance(5)
    admission = await t.acquire("b")
    assert admission is not None
    assert await t.acquire("b") is None
    await t.release(admission)
    assert await t.acquire("b") is not None
