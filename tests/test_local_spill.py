"""The local GPU is filled before anyone is paid, and work spills when it is full.

Real sockets: the gateway (uvicorn) in front of the emulator fleet, whose
local backend emulates a GPU with a bounded queue (429 + Retry-After when
full), as the real local backend does.
"""

from __future__ import annotations

import asyncio
import collections

import httpx
import pytest

from gateway.providers.base import ProbeResult
from tests.emulators.launcher import EmulatorFleet
from tests.gateway_support import ServerThread, make_app

BODY = {"prompt": "a harbour at night", "size": "1024x1024", "response_format": "b64_json"}


@pytest.fixture(scope="module")
def fleet():
    fleet = EmulatorFleet.start_in_thread()
    yield fleet
    fleet.stop_thread()


@pytest.fixture
def gateway(fleet):
    fleet.reset()
    app = make_app(env=fleet.env())
    with ServerThread(app) as server:
        yield server, app


async def _burst(url: str, count: int, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(url + "/v1/images/generations", json=BODY, headers=headers) for _ in range(count)))


def test_local_cheapest_fills_up_and_the_rest_spill_to_next_cheapest(fleet, gateway):
    server, _app = gateway
    # One image at a time on the "GPU", one more may wait; each takes 400 ms.
    fleet["local"].set_knobs({"local": {"max_concurrency": 1, "queue_capacity": 1}, "job": {"run_ms": 400}})
    responses = asyncio.run(_burst(server.url, 8))
    assert [r.status_code for r in responses] == [200] * 8
    served = collections.Counter(r.headers["x-klein-backend"] for r in responses)
    assert served["local"] >= 2  # the GPU was used to capacity
    assert served["replicate"] >= 1  # the overflow went to the next cheapest, not the dearest
    assert set(served) <= {"local", "replicate"}
    spilled = [r for r in responses if r.headers["x-klein-backend"] == "replicate"]
    assert all(r.headers["x-klein-attempts"] == "2" for r in spilled)
    # A full queue is back-pressure, not sickness: the local backend stays healthy.
    rows = {row["name"]: row for row in httpx.get(server.url + "/v1/backends").json()["data"]}
    assert rows["local"]["state"] == "closed"
    assert rows["local"]["window"]["failures"] == 0


def test_local_queue_wait_beyond_the_deadline_routes_to_hosted_without_trying_local(fleet, gateway):
    server, app = gateway
    gw = app.state.gateway
    before = httpx.get(fleet["local"].base_url + "/_admin/stats").json()
    # The local backend reports a 30 s queue; this request must finish within 5 s.
    asyncio.run(gw.health.record_probe("local", ProbeResult(ok=True, live={"estimated_wait_s": 30.0, "marginal_usd_per_image": 0.0004})))
    resp = httpx.post(server.url + "/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "5000"}, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["x-klein-backend"] == "replicate"
    assert resp.headers["x-klein-attempts"] == "1"
    after = httpx.get(fleet["local"].base_url + "/_admin/stats").json()
    assert after["generations"] == before["generations"]
    # With a deadline the queue fits, the GPU is used again.
    resp = httpx.post(server.url + "/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "60000"}, timeout=30)
    assert resp.headers["x-klein-backend"] == "local"
