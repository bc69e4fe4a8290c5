"""Idempotency keys fail closed while the shared store is away.

Two gateways (real uvicorn servers in this process) share one real
`redis-server`, which is stopped mid-test. A request with an
Idempotency-Key cannot be claimed on memory state (each replica would claim
it for itself and both would pay a provider), so it is a retryable 503
`idempotency_unavailable`; a request without a key still runs; when Redis
is back the key works again, once across both replicas.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.state import MemoryStore, ResilientStore
from gateway.state.base import StoreUnavailable
from tests.gateway_support import ENV, FakeAdapter, ServerThread, install_fakes, make_app
from tests.redis_server import RedisServer, redis_available

BACKENDS = ("fal", "replicate", "runflow", "empiriolabs", "local")
BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url"}


@dataclass
class Rig:
    redis: RedisServer
    urls: list[str]
    fakes: list[FakeAdapter]
    client: httpx.Client

    @property
    def provider_calls(self) -> int:
        return sum(len(f.calls) for f in self.fakes)

    def post(self, replica: int, key: str | None = None) -> httpx.Response:
        headers = {"idempotency-key": key} if key else {}
        return self.client.post(f"{self.urls[replica]}/v1/images/generations", json=BODY, headers=headers)

    def retried(self, replica: int, key: str, timeout: float = 10.0) -> httpx.Response:
        """As a client honouring Retry-After would: again while the answer is the outage's 503."""
        end = time.monotonic() + timeout
        answer = self.post(replica, key)
        while answer.status_code == 503 and time.monotonic() < end:
            time.sleep(0.2)
            answer = self.post(replica, key)
        return answer


@pytest.fixture
def rig() -> Iterator[Rig]:
    if not redis_available():
        pytest.skip("redis-server is not installed")
    redis = RedisServer().start()
    env = {**ENV, "REDIS_URL": redis.url, "KLEIN_STATE_NAMESPACE": f"idem-{uuid.uuid4().hex[:8]}"}
    servers, fakes = [], []
    try:
        for _ in range(2):
            app = make_app(env)
            mine = {name: FakeAdapter(name) for name in BACKENDS}
            install_fakes(app, mine)
            fakes += mine.values()
            servers.append(ServerThread(app).__enter__())
        with httpx.Client(timeout=30) as client:
            yield Rig(redis, [s.url for s in servers], fakes, client)
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        redis.stop()


def test_with_redis_down_a_keyed_request_is_refused_on_both_replicas_and_no_provider_is_paid(rig: Rig) -> None:
    first = rig.post(0, "key-up")
    assert first.status_code == 200, first.text
    assert rig.post(1, "key-up").headers.get("idempotent-replayed") == "true"  # shared while Redis is up
    assert rig.provider_calls == 1

    rig.redis.stop()
    for replica in (0, 1, 0, 1):
        refused = rig.post(replica, "key-down")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "idempotency_unavailable"
        assert refused.headers.get("retry-after") and refused.headers.get("x-should-retry") == "true"
    assert rig.provider_calls == 1  # neither replica ran the keyed request on memory state

    unkeyed = rig.post(1)
    assert unkeyed.status_code == 200, unkeyed.text  # requests without a key are unaffected
    assert rig.provider_calls == 2

    rig.redis.start()
    answers = [rig.retried(0, "key-down"), rig.retried(1, "key-down")]
    assert [a.status_code for a in answers] == [200, 200], answers[-1].text
    assert answers[1].headers.get("idempotent-replayed") == "true"
    assert rig.provider_calls == 3  # once across both replicas


class DeadPrimary(MemoryStore):
    async def set_if_absent(self, key: str, value: str, *, ttl_s: float) -> bool:
        raise ConnectionError("down")

    async def get(self, key: str) -> str | None:
        raise ConnectionError("down")


@pytest.mark.parametrize("op", ["set_if_absent_shared", "get_shared"])
async def test_the_shared_operations_raise_instead_of_answering_from_memory(op: str) -> None:
    store = ResilientStore(DeadPrimary())
    with pytest.raises(StoreUnavailable):
        if op == "set_if_absent_shared":
            await store.set_if_absent_shared("k", "v", ttl_s=5)
        else:
            await store.get_shared("k")
    assert await store.fallback.get("k") is None  # nothing was claimed in memory either


async def test_a_store_with_no_fallback_answers_the_shared_operations_itself() -> None:
    store = MemoryStore()
    assert await store.set_if_absent_shared("k", "v", ttl_s=5)
    assert not await store.set_if_absent_shared("k", "w", ttl_s=5)
    assert await store.get_shared("k") == "v"
