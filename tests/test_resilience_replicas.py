"""Three gateway processes sharing one real Redis: breakers travel, outages do not fail requests.

The set-up is what an operator runs: three `python -m gateway.cli serve`
processes on free loopback ports, with `REDIS_URL` pointing at one
`redis-server` this module starts itself, and `KLEIN_*_BASE_URL` and keys
pointing at one emulator fleet served from this process. Every process is
stopped by its pid. The emulators' own counters are the witness for what
reached a backend.

Below them, the same promises on ResilientStore alone (no Redis needed):
what a replica read from the shared store is remembered for an outage.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as redis_client

from gateway.health.records import merge_pushed_back
from gateway.state import MemoryStore, ResilientStore
from tests.emulators import EmulatorFleet
from tests.gateway_support import NO_LEDGER, free_port, wait_until
from tests.redis_server import RedisServer, redis_available

REPO = Path(__file__).resolve().parent.parent
BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url"}
# At 512x512 the shipped sheets put the local GPU first (cheapest); fal is next.
CHEAPEST = "local"

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@dataclass
class Replica:
    """One gateway process, known by its pid and port."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@dataclass
class Rig:
    fleet: EmulatorFleet
    redis: RedisServer
    replicas: list[Replica]
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def stats(self, backend: str) -> dict:
        return self.client.get(f"{self.fleet[backend].base_url}/_admin/stats").json()

    def knobs(self, backend: str, patch: dict) -> None:
        resp = self.client.post(f"{self.fleet[backend].base_url}/_admin/knobs", json=patch)
        assert resp.status_code == 200, resp.text

    def backend_state(self, replica: Replica, backend: str) -> str:
        rows = self.client.get(f"{replica.url}/v1/backends").json()["data"]
        return next(r["state"] for r in rows if r["name"] == backend)

    def generate(self, replica: Replica) -> httpx.Response:
        return self.client.post(f"{replica.url}/v1/images/generations", json=BODY)

    def routes_everywhere(self, replica: Replica) -> bool:
        """The replica's own routing view (its local health copy) finds every enabled backend closed."""
        rows = self.client.post(f"{replica.url}/v1/images/quote", json={"prompt": "a lighthouse", "size": "1024x1024"}).json()["backends"]
        return all(r["state"] in ("closed", "disabled") for r in rows)

    def store_status(self, replica: Replica) -> str:
        return self.client.get(f"{replica.url}/readyz").json()["state_store"]


def start_replica(name: str, env: dict[str, str], log_dir: Path) -> Replica:
    port = free_port()
    log_path = log_dir / f"gateway-{name}.log"
    with log_path.open("wb") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--workers", "1", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Replica(name, port, proc, log_path)


def wait_ready(replica: Replica, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.proc.poll() is not None:
            raise RuntimeError(f"gateway {replica.name} exited with {replica.proc.returncode}:\n{replica.log_tail()}")
        try:
            if httpx.get(f"{replica.url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"gateway {replica.name} was not ready in {timeout:g}s:\n{replica.log_tail()}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One Redis (this module's own, so stopping it disturbs no other test),
    one emulator fleet, three gateway processes sharing both."""
    log_dir = tmp_path_factory.mktemp("replicas")
    redis = RedisServer().start()
    fleet = EmulatorFleet.start_in_thread()
    replicas: list[Replica] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KLEIN_", "FAL_", "REPLICATE_", "RUNFLOW_", "EMPIRIOLABS_", "REDIS_"))}
        env.update(fleet.env())
        env.update(NO_LEDGER)
        env.update({"REDIS_URL": redis.url, "KLEIN_STATE_NAMESPACE": f"replicas-{uuid.uuid4().hex[:8]}", "PYTHONUNBUFFERED": "1"})
        replicas = [start_replica(name, env, log_dir) for name in ("A", "B", "C")]
        for replica in replicas:
            wait_ready(replica)
        rig = Rig(fleet, redis, replicas)
        yield rig
        rig.client.close()
    finally:
        for replica in replicas:
            replica.stop()
        fleet.stop_thread()
        redis.close()


@pytest.fixture
def clean(rig: Rig) -> Iterator[Rig]:
    """Emulators back to healthy and empty; Redis running and empty, and every
    gateway's local health copy caught up with it (within one refresh), so
    an empty Redis is a fresh start."""
    rig.fleet.reset()
    if not rig.redis.running:
        rig.redis.start()
    with redis_client.Redis.from_url(rig.redis.url) as r:
        r.flushdb()
    assert wait_until(lambda: all(rig.routes_everywhere(r) for r in rig.replicas), timeout=3.0), "a replica kept health state Redis no longer holds"
    yield rig
    if not rig.redis.running:  # a test that failed while Redis was down
        rig.redis.start()


@pytest.mark.slow
@needs_redis
def test_breaker_opened_through_one_replica_is_honoured_by_the_others_within_a_second(clean: Rig) -> None:
    rig = clean
    a, b, c = rig.replicas
    rig.knobs(CHEAPEST, {"faults": {"server_error": 1.0, "server_error_status": 500}})

    # Requests through A fail over to the next backend until A's breaker on the cheapest opens.
    for _ in range(10):
        resp = rig.generate(a)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-klein-backend"] != CHEAPEST
        if rig.backend_state(a, CHEAPEST) == "open":
            break
    assert rig.backend_state(a, CHEAPEST) == "open"
    opened_at = time.monotonic()
    calls_when_opened = rig.stats(CHEAPEST)["paid_calls"]
    assert calls_when_opened >= 1

    # B and C read the same breaker from Redis: open within one second.
    assert wait_until(lambda: rig.backend_state(b, CHEAPEST) == "open" and rig.backend_state(c, CHEAPEST) == "open", timeout=1.0)
    assert time.monotonic() - opened_at < 1.0

    # ...and route around it without calling it (well inside the 5 s cooldown).
    for replica in (b, c, b, c):
        resp = rig.generate(replica)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-klein-backend"] != CHEAPEST
        assert resp.headers["x-klein-attempts"] == "1"
    assert rig.stats(CHEAPEST)["paid_calls"] == calls_when_opened
    assert time.monotonic() - opened_at < 5.0, "the checks ran past the cooldown; the breaker may have half-opened"


@pytest.mark.slow
@needs_redis
def test_redis_stopped_and_restarted_mid_stream_loses_no_request(clean: Rig) -> None:
    rig = clean
    stop = threading.Event()
    results: list[tuple[float, str, int, str]] = []  # (when, replica, status, body head)
    lock = threading.Lock()

    def stream(offset: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = offset
            while not stop.is_set():
                replica = rig.replicas[i % len(rig.replicas)]
                i += 1
                try:
                    resp = client.post(f"{replica.url}/v1/images/generations", json=BODY)
                    outcome = (time.monotonic(), replica.name, resp.status_code, resp.text[:200])
                except httpx.HTTPError as exc:
                    outcome = (time.monotonic(), replica.name, 0, type(exc).__name__)
                with lock:
                    results.append(outcome)

    workers = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        assert all(rig.store_status(r) == "ok" for r in rig.replicas)
        rig.redis.stop()
        down_at = time.monotonic()
        assert wait_until(lambda: all(rig.store_status(r) == "degraded" for r in rig.replicas), timeout=5.0), "readyz did not report degraded"
        for r in rig.replicas:  # degraded is not unready: the replica carries on in memory
            assert httpx.get(f"{r.url}/readyz", timeout=5).status_code == 200
        time.sleep(max(0.0, 1.5 - (time.monotonic() - down_at)))
        rig.redis.start()
        up_at = time.monotonic()
        assert wait_until(lambda: all(rig.store_status(r) == "ok" for r in rig.replicas), timeout=5.0), "readyz did not recover"
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=35)

    failures = [r for r in results if r[2] != 200]
    during = [r for r in results if down_at <= r[0] <= up_at]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    assert len(during) >= 3, f"only {len(during)} requests completed while Redis was down"
    assert {r[1] for r in during} == {"A", "B", "C"}
    assert all(r.proc.poll() is None for r in rig.replicas)

    # Shared state works again after the restart: a breaker opened through one replica reaches the others.
    rig.knobs(CHEAPEST, {"faults": {"server_error": 1.0}})
    a, b, _ = rig.replicas
    for _ in range(10):
        assert rig.generate(a).status_code == 200
        if rig.backend_state(a, CHEAPEST) == "open":
            break
    assert wait_until(lambda: rig.backend_state(b, CHEAPEST) == "open", timeout=1.0)


def open_breaker_through(rig: Rig, replica: Replica, backend: str) -> None:
    for _ in range(10):
        assert rig.generate(replica).status_code == 200
        if rig.backend_state(replica, backend) == "open":
            return
    raise AssertionError(f"{backend}'s breaker did not open through {replica.name}")


@pytest.mark.slow
@needs_redis
def test_breaker_learned_from_another_replica_is_still_honoured_while_redis_is_down(clean: Rig) -> None:
    """B and C only ever read the breaker A opened; they keep honouring it
    through an outage because reads are mirrored into their memory."""
    rig = clean
    a, b, c = rig.replicas
    rig.knobs(CHEAPEST, {"faults": {"server_error": 1.0}})
    open_breaker_through(rig, a, CHEAPEST)
    assert rig.backend_state(b, CHEAPEST) == "open" and rig.backend_state(c, CHEAPEST) == "open"
    calls_before = rig.stats(CHEAPEST)["paid_calls"]
    rig.redis.stop()
    assert wait_until(lambda: all(rig.store_status(r) == "degraded" for r in rig.replicas), timeout=3.0)
    assert {r.name: rig.backend_state(r, CHEAPEST) for r in rig.replicas} == {"A": "open", "B": "open", "C": "open"}
    for replica in (b, c, a):
        resp = rig.generate(replica)
        assert resp.status_code == 200 and resp.headers["x-klein-attempts"] == "1", resp.headers
    assert rig.stats(CHEAPEST)["paid_calls"] == calls_before


# ---- the mirror underneath, without Redis: ResilientStore over a primary that can fail ----


class FlakyStore(MemoryStore):
    """A primary that raises on every call while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name in {"get", "get_many", "set", "set_if_absent", "compare_and_set", "incr", "delete"}:

            async def guarded(*args, **kwargs):
                if self.down:
                    raise ConnectionError("down")
                return await attr(*args, **kwargs)

            return guarded
        return attr


def resilient_over(primary: FlakyStore) -> tuple[ResilientStore, list[float]]:
    now = [0.0]
    return ResilientStore(primary, retry_interval_s=1.0, clock=lambda: now[0], merge=merge_pushed_back), now


async def test_values_read_from_the_shared_store_are_remembered_for_an_outage() -> None:
    primary = FlakyStore()
    store, _ = resilient_over(primary)
    await primary.set("health:local:breaker", "open-by-another-replica", ttl_s=60)  # another replica wrote it
    await primary.set("health:fal:park", "123.0", ttl_s=60)
    assert await store.get("health:local:breaker") == "open-by-another-replica"
    assert await store.get_many(["health:fal:park", "health:fal:creds"]) == ["123.0", None]
    primary.down = True
    assert await store.get("health:local:breaker") == "open-by-another-replica"
    assert await store.get_many(["health:fal:park", "health:fal:creds"]) == ["123.0", None]
    assert store.degraded


async def test_a_key_the_shared_store_no_longer_holds_is_forgotten_too() -> None:
    primary = FlakyStore()
    store, _ = resilient_over(primary)
    await store.set("health:fal:creds", "1.0", ttl_s=60)  # this replica marked the key bad...
    await primary.delete("health:fal:creds")  # ...and another cleared the mark after a good probe
    assert await store.get_many(["health:fal:creds"]) == [None]
    primary.down = True
    assert await store.get("health:fal:creds") is None


async def test_a_key_learned_during_the_outage_survives_the_first_read_after_it() -> None:
    primary = FlakyStore()
    store, now = resilient_over(primary)
    primary.down = True
    await store.set("health:local:breaker", "opened-alone", ttl_s=60)
    primary.down = False
    now[0] += 2  # the retry is due: this read finds the primary back, without the key
    assert await store.get("health:local:breaker") is None
    for _ in range(3):  # the push-back task
        await asyncio.sleep(0)
    assert await primary.get("health:local:breaker") == "opened-alone"
    await store.close()


@pytest.mark.parametrize(
    "present,mirrored,ttl_s,want_value,want_left_s",
    [
        (None, "v", 300, "v", 300),  # a new value, for the mirror's TTL
        (("v", 900), "v", 300, "v", 900),  # the same value keeps its longer expiry
        (("old", 900), "new", 300, "new", 300),  # a changed value replaces it
        (("v", 900), None, 300, None, None),  # absent in the shared store: dropped
    ],
)
def test_memory_mirror_table(present, mirrored, ttl_s, want_value, want_left_s) -> None:
    now = [0.0]
    memory = MemoryStore(clock=lambda: now[0])
    if present:
        asyncio.run(memory.set("k", present[0], ttl_s=present[1]))
    memory.mirror([("k", mirrored)], ttl_s=ttl_s)
    exported = memory.export("k")
    assert (exported[0] if exported else None) == want_value
    if want_left_s is not None:
        assert exported is not None and exported[1] == pytest.approx(want_left_s)
