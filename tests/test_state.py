"""The state store contract, for memory and Redis, and the Redis-to-memory fallback."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.health.records import merge_pushed_back
from gateway.state import MemoryStore, ResilientStore, open_store
from gateway.state.base import StateStore, StoreStatus
from gateway.state.redis import RedisStore
from tests.redis_server import RedisServer, redis_available

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


# ---- the contract, against both stores -------------------------------------


async def test_set_then_get_and_get_many_keep_order(state_store: StateStore) -> None:
    await state_store.set("a", "1", ttl_s=60)
    await state_store.set("c", "3", ttl_s=60)
    assert await state_store.get("a") == "1"
    assert await state_store.get("b") is None
    assert await state_store.get_many(["c", "b", "a"]) == ["3", None, "1"]
    assert await state_store.get_many([]) == []


async def test_set_if_absent_only_first_writer_wins(state_store: StateStore) -> None:
    assert await state_store.set_if_absent("lease", "one", ttl_s=60) is True
    assert await state_store.set_if_absent("lease", "two", ttl_s=60) is False
    assert await state_store.get("lease") == "one"


@pytest.mark.parametrize(
    ("start", "expected", "new", "wins", "after"),
    [
        (None, None, "x", True, "x"),  # absent expected absent
        ("a", None, "x", False, "a"),  # present, expected absent
        ("a", "a", "x", True, "x"),  # matches
        ("a", "b", "x", False, "a"),  # stale expectation
        (None, "a", "x", False, None),  # expected a value that is gone
    ],
)
async def test_compare_and_set_table(state_store: StateStore, start: str | None, expected: str | None, new: str, wins: bool, after: str | None) -> None:
    if start is not None:
        await state_store.set("k", start, ttl_s=60)
    assert await state_store.compare_and_set("k", expected, new, ttl_s=60) is wins
    assert await state_store.get("k") == after


async def test_compare_and_set_lets_exactly_one_racer_win(state_store: StateStore) -> None:
    await state_store.set("k", "v0", ttl_s=60)
    results = await asyncio.gather(*(state_store.compare_and_set("k", "v0", f"v{i}", ttl_s=60) for i in range(1, 21)))
    assert sum(results) == 1


async def test_incr_counts_from_zero_and_delete_resets(state_store: StateStore) -> None:
    assert await state_store.incr("n", ttl_s=60) == 1
    assert await state_store.incr("n", 4, ttl_s=60) == 5
    assert await state_store.get("n") == "5"
    await state_store.delete("n")
    assert await state_store.incr("n", ttl_s=60) == 1


async def test_samples_are_newest_first_and_bounded(state_store: StateStore) -> None:
    for value in range(10):
        await state_store.append_sample("lat", float(value), keep=4, ttl_s=60)
    assert await state_store.samples("lat") == [9.0, 8.0, 7.0, 6.0]
    assert await state_store.samples("none") == []


async def test_values_expire_after_their_ttl(state_store: StateStore) -> None:
    await state_store.set("short", "v", ttl_s=0.05)
    await state_store.incr("count", ttl_s=0.05)
    await state_store.append_sample("lat", 1.0, keep=3, ttl_s=0.05)
    await asyncio.sleep(0.12)
    assert await state_store.get_many(["short", "count"]) == [None, None]
    assert await state_store.samples("lat") == []


async def test_status_is_ok_when_reachable(state_store: StateStore) -> None:
    assert await state_store.status() == "ok"


# ---- memory specifics ---------------------------------------------------------


async def test_memory_sweep_drops_expired_entries_so_the_store_stays_bounded() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    for i in range(100):
        await store.set(f"k{i}", "v", ttl_s=1)
    now[0] = 2.0
    assert store.sweep() == 100
    assert len(store) == 0


# ---- Redis specifics ----------------------------------------------------------


@needs_redis
async def test_redis_keys_are_prefixed_with_klein_and_the_namespace_and_carry_ttls(redis_server) -> None:
    ns = f"ns-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(redis_server.url, namespace=ns)
    raw = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        await store.set("health:fal:park", "1", ttl_s=30)
        await store.incr("health:fal:consec", ttl_s=30)
        await store.append_sample("health:fal:lat", 0.5, keep=5, ttl_s=30)
        keys = sorted(await raw.keys(f"klein:{ns}:*"))
        assert keys == [f"klein:{ns}:health:fal:{k}" for k in ("consec", "lat", "park")]
        for k in keys:
            assert 0 < await raw.pttl(k) <= 30_000
    finally:
        await raw.aclose()
        await store.close()


@needs_redis
def test_redis_server_helper_restarts_on_the_same_port() -> None:
    with RedisServer() as server:
        port = server.port
        server.stop()
        assert not server.running
        server.start()
        assert server.running and server.port == port


def test_open_store_is_memory_without_a_url_and_resilient_redis_with_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert isinstance(open_store(), MemoryStore)
    store = open_store("redis://127.0.0.1:1/0")
    assert isinstance(store, ResilientStore) and isinstance(store.primary, RedisStore)


# ---- ResilientStore: the circuit on the primary ---------------------------------


class BrokenStore(MemoryStore):
    """A primary that fails every call while `broken`, counting the calls it got."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.calls = 0

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name in {"get", "get_many", "set", "set_if_absent", "compare_and_set", "compare_and_delete", "incr", "delete", "append_sample", "samples"}:

            async def guarded(*args, **kwargs):
                self.calls += 1
                await asyncio.sleep(0)  # a real round trip suspends
                if self.broken:
                    raise ConnectionError("down")
                return await attr(*args, **kwargs)

            return guarded
        return attr

    async def status(self) -> StoreStatus:
        self.calls += 1
        return "degraded" if self.broken else "ok"


async def test_resilient_store_falls_back_and_asks_a_dead_primary_once_per_retry_interval() -> None:
    now = [100.0]
    primary = BrokenStore()
    store = ResilientStore(primary, retry_interval_s=1.0, clock=lambda: now[0], merge=merge_pushed_back)
    await store.set("k", "before", ttl_s=60)
    primary.broken = True
    primary.calls = 0
    for i in range(50):
        await store.set(f"x{i}", "v", ttl_s=60)
        assert await store.get("k") == "before"  # the mirror in memory answers
    assert primary.calls == 1
    assert await store.status() == "degraded"
    now[0] += 1.5
    primary.broken = False
    assert await store.status() == "ok"


async def test_resilient_store_pushes_keys_learned_alone_back_without_overwriting() -> None:
    now = [0.0]
    primary = BrokenStore()
    store = ResilientStore(primary, retry_interval_s=1.0, clock=lambda: now[0], merge=merge_pushed_back)
    primary.broken = True
    await store.set("learned-alone", "open", ttl_s=60)
    await store.set("also-written-elsewhere", "mine", ttl_s=60)
    primary.broken = False
    await primary.set("also-written-elsewhere", "theirs", ttl_s=60)
    now[0] += 2
    assert await store.status() == "ok"
    await store.resynced()
    assert await primary.get("learned-alone") == "open"
    assert await primary.get("also-written-elsewhere") == "theirs"
    await store.close()


async def test_a_lease_given_back_while_the_primary_was_down_is_freed_there_when_it_returns() -> None:
    now = [0.0]
    primary = BrokenStore()
    store = ResilientStore(primary, retry_interval_s=1.0, clock=lambda: now[0], merge=merge_pushed_back)
    assert await store.set_if_absent("lease", "t1 token", ttl_s=60)
    primary.broken = True
    assert await store.compare_and_delete("lease", "t1 token")  # this replica's copy is gone at once
    primary.broken = False
    assert await primary.get("lease") == "t1 token"  # the shared copy would block the slot until it lapses
    now[0] += 2
    assert await store.status() == "ok"
    await store.resynced()
    assert await primary.get("lease") is None
    await store.close()


@needs_redis
async def test_redis_killed_mid_run_degrades_to_memory_and_recovers_when_restarted() -> None:
    with RedisServer() as server:
        store = ResilientStore(RedisStore.from_url(server.url, namespace="kill"), merge=merge_pushed_back)  # retries once a second
        other = RedisStore.from_url(server.url, namespace="kill")  # another replica's view
        try:
            await store.set("before", "1", ttl_s=60)
            assert await other.get("before") == "1"
            server.stop()
            started = time.monotonic()
            for i in range(20):  # every call keeps working, fast
                await store.set(f"during{i}", "v", ttl_s=60)
                assert await store.get("before") == "1"
                assert await store.incr("count", ttl_s=60) == i + 1
            assert time.monotonic() - started < 2.0
            assert await store.status() == "degraded"

            server.start()
            deadline = time.monotonic() + 3.0
            while await store.status() != "ok":
                assert time.monotonic() < deadline, "status did not return to ok"
                await asyncio.sleep(0.05)
            await store.set("after", "2", ttl_s=60)
            assert await other.get("after") == "2"  # shared again
            await asyncio.sleep(0.05)  # the push-back of keys written while degraded
            assert await other.get("during0") == "v"
        finally:
            await other.close()
            await store.close()


async def test_only_one_call_retries_a_primary_that_was_down() -> None:
    now = [0.0]
    primary = BrokenStore()
    store = ResilientStore(primary, retry_interval_s=1.0, clock=lambda: now[0], merge=merge_pushed_back)
    primary.broken = True
    await store.set("k", "v", ttl_s=60)
    now[0] += 2
    primary.calls = 0
    await asyncio.gather(*(store.get("k") for _ in range(20)))
    assert primary.calls == 1


# ---- batches: several operations, one round trip -----------------------------

from gateway.state.base import Op  # noqa: E402 - beside the tests that use it


async def test_a_batch_answers_each_operation_in_order(state_store: StateStore) -> None:
    await state_store.set("park", "100.0", ttl_s=60)
    answers = await state_store.batch(
        [
            Op.incr("n", ttl_s=60),
            Op.incr("n", 2, ttl_s=60),
            Op.set("s", "x", ttl_s=60),
            Op.get("s"),
            Op.get("missing"),
            Op.get("n"),
            Op.append("lat", 1.5, keep=2, ttl_s=60),
            Op.append("lat", 2.5, keep=2, ttl_s=60),
            Op.append("lat", 3.5, keep=2, ttl_s=60),
            Op.samples("lat"),
            Op.append("lat2", 1.0, 2.0, 3.0, keep=2, ttl_s=60),
            Op.samples("lat2"),
            Op.raise_to("park", 50.0, ttl_s=60),  # a shorter parking never shortens a longer one
            Op.raise_to("park", 150.0, ttl_s=60),
            Op.raise_to("new_park", 10.0, ttl_s=60),
            Op.delete("s"),
            Op.get("s"),
            Op.publish("health", "hello"),
        ]
    )
    assert answers == [1, 3, None, "x", None, "3", None, None, None, [3.5, 2.5], None, [3.0, 2.0], False, True, True, None, None, None]
    assert await state_store.get_many(["park", "new_park"]) == ["150.0", "10.0"]


@pytest.mark.parametrize(
    ("ops", "trip"),
    [
        pytest.param([Op.get("a"), Op.get("b"), Op.samples("lat")], "batch_read", id="reads"),
        pytest.param([Op.incr("n", ttl_s=60), Op.set("s", "1", ttl_s=60), Op.append("lat", 1.0, keep=5, ttl_s=60), Op.get("a")], "batch_write", id="writes"),
    ],
)
@needs_redis
async def test_a_redis_batch_is_one_round_trip(redis_server, ops: list[Op], trip: str) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=f"batch-{uuid.uuid4().hex[:8]}")
    trips: list[str] = []
    store.count_round_trips(trips.append)
    try:
        await store.batch(ops)
        assert trips == [trip]
    finally:
        await store.close()


@needs_redis
async def test_a_resilient_batch_mirrors_into_memory_and_carries_on_there_when_redis_is_gone() -> None:
    with RedisServer() as server:
        store = ResilientStore(RedisStore.from_url(server.url, namespace="b"), MemoryStore(), retry_interval_s=0.1, merge=merge_pushed_back)
        try:
            await store.batch([Op.set("health:x:breaker", "rec", ttl_s=60), Op.incr("w", ttl_s=60), Op.raise_to("health:x:park", 5.0, ttl_s=60)])
            server.stop()
            assert await store.batch([Op.get("health:x:breaker"), Op.incr("w", ttl_s=60), Op.get("health:x:park"), Op.publish("health", "m")]) == ["rec", 2, "5.0", None]
            assert store.degraded
            await store.batch([Op.set("health:x:breaker", "opened-alone", ttl_s=60)])
            server.start()
            deadline = time.monotonic() + 3
            while await store.status() != "ok":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await store.resynced()
            assert await store.primary.get("health:x:breaker") == "opened-alone"  # a set made while down is merged back
        finally:
            await store.close()


@needs_redis
async def test_pub_sub_reaches_every_listener_on_the_namespace_and_no_other(redis_server) -> None:
    ns = f"ps-{uuid.uuid4().hex[:8]}"
    sender, mine, other = (RedisStore.from_url(redis_server.url, namespace=n) for n in (ns, ns, ns + "-other"))
    got: dict[str, list[str]] = {"mine": [], "other": []}
    tasks = [asyncio.create_task(mine.listen("health", got["mine"].append)), asyncio.create_task(other.listen("health", got["other"].append))]
    try:
        deadline = time.monotonic() + 2
        while not got["mine"]:  # until the subscription is in place
            assert time.monotonic() < deadline
            await sender.batch([Op.publish("health", "ping")])
            await asyncio.sleep(0.02)
        assert set(got["mine"]) == {"ping"} and got["other"] == []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in (sender, mine, other):
            await s.close()


async def test_memory_pub_sub_delivers_in_process() -> None:
    store = MemoryStore()
    got: list[str] = []
    task = asyncio.create_task(store.listen("health", got.append))
    await asyncio.sleep(0)
    await store.batch([Op.publish("health", "m")])
    await store.publish("elsewhere", "n")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert got == ["m"]
