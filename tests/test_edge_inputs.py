"""Inputs at the edges of what is accepted: the values just inside a limit
still work, and an idempotent replay never counts its spend twice.

The values just outside each limit are rows of tests/test_hostile_inputs.py
(a 4xx in the OpenAI envelope, no backend called)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.context import MIN_DEADLINE_MS
from tests.gateway_support import ENV, FakeAdapter, install_fakes, make_app, png_bytes

CALLER_KEY = "edge-caller-key-3b7e21"
METRICS_TOKEN = "edge-metrics-token-9a0c"
AUTH = {"authorization": f"Bearer {CALLER_KEY}"}
EDGE_ENV = {**ENV, "KLEIN_GATEWAY_KEYS": CALLER_KEY, "KLEIN_METRICS_TOKEN": METRICS_TOKEN}
BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "b64_json"}


@pytest.fixture
async def client():
    app = make_app(EDGE_ENV)
    fakes = {name: FakeAdapter(name) for name in app.state.gateway.fleet.backends}
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as c:
        c.fakes = fakes  # type: ignore[attr-defined]
        yield c


# ---- /v1/usage: times inside the calendar once moved to UTC are answered ------------


@pytest.mark.parametrize(
    "query",
    [
        "start=0001-01-01T00:00:00-14:00&end=0001-01-03",  # the first day, west of UTC: still inside
        "start=0001-01-01&end=0001-01-02",
        "end=0001-01-15",  # the default span would start before the calendar: clamped to its first day
        "start=9999-12-30&end=9999-12-31T23:59:59%2B14:00",  # the last day, east of UTC: still inside
        "start=9999-12-30&end=9999-12-31T23:59:59",
    ],
)
async def test_usage_answers_times_that_stay_inside_the_calendar_in_utc(client, query: str) -> None:
    resp = await client.get(f"/v1/usage?{query}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert datetime.fromisoformat(body["start"]) < datetime.fromisoformat(body["end"])
    assert body["total"]["requests"] == 0


# ---- n: JSON integers in JSON, text in a form ---------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4])
async def test_a_json_integer_n_is_accepted(client, n: int) -> None:
    resp = await client.post("/v1/images/generations", json={**BODY, "n": n}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == n


async def test_a_multipart_n_is_text_and_is_read_as_an_integer(client) -> None:
    files = {"image": ("ref.png", png_bytes(512, 512), "image/png")}
    resp = await client.post("/v1/images/edits", data={"prompt": "make it night", "size": "512x512", "n": "2", "response_format": "b64_json"}, files=files, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 2


@pytest.mark.parametrize("n", ["true", "2.0", "two"])
async def test_a_multipart_n_that_is_not_an_integer_is_a_400(client, n: str) -> None:
    files = {"image": ("ref.png", png_bytes(512, 512), "image/png")}
    resp = await client.post("/v1/images/edits", data={"prompt": "make it night", "size": "512x512", "n": n}, files=files, headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "n"
    assert not any(f.calls for f in client.fakes.values())


# ---- the deadline floor ------------------------------------------------------------


async def test_the_shortest_accepted_deadline_is_honoured(client) -> None:
    """100 ms is accepted and served by a backend measured to answer within it (before
    any latency is measured the shipped priors, 0.8 s at the fastest, refuse it as deadline_too_short)."""
    await client.app.state.gateway.health.record_success("local", 0.01)
    resp = await client.post("/v1/images/generations", json=BODY, headers={**AUTH, "x-klein-deadline-ms": str(MIN_DEADLINE_MS)})
    assert resp.status_code == 200, resp.text


async def test_a_deadline_under_the_floor_spends_nothing_and_records_no_cost(client) -> None:
    resp = await client.post("/v1/images/generations", json=BODY, headers={**AUTH, "x-klein-deadline-ms": str(MIN_DEADLINE_MS - 1)})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_deadline"
    assert resp.headers["x-klein-cost-usd"] == "0"
    assert not any(f.calls for f in client.fakes.values())


# ---- async multipart metadata: inside the bounds it is kept -------------------------


async def test_async_multipart_metadata_nested_to_the_limit_reaches_the_metadata_check(client) -> None:
    """32 levels pass the depth bound; the answer is then the ordinary metadata rule (strings only)."""
    files = {"image": ("ref.png", png_bytes(512, 512), "image/png")}
    deep = '{"a": ' + "[" * 31 + "]" * 31 + "}"
    resp = await client.post("/v1/images/edits", data={"prompt": "x", "size": "512x512", "metadata": deep}, files=files, headers={**AUTH, "prefer": "respond-async"})
    assert resp.status_code == 400
    assert "string" in resp.json()["error"]["message"] and "nested" not in resp.json()["error"]["message"]


# ---- an idempotent replay spends nothing, and its headers say so ---------------------


def _cost_metric(text: str) -> Decimal:
    return sum((Decimal(str(s.value)) for f in text_string_to_metric_families(text) for s in f.samples if s.name == "klein_cost_usd_total"), Decimal(0))


async def _ledger_total(app: Any) -> Decimal:
    now = datetime.now(UTC)
    rows = await app.state.gateway.billing.ledger.query(now - timedelta(hours=1), now + timedelta(hours=1))
    return sum((Decimal(r.estimated_usd) for r in rows), Decimal(0))


@pytest.mark.parametrize("replays", [1, 3])
async def test_a_replay_answers_cost_zero_and_headers_sum_to_the_ledger_and_metrics(client, replays: int) -> None:
    headers = {**AUTH, "idempotency-key": f"edge-order-{replays}"}
    first = await client.post("/v1/images/generations", json=BODY, headers=headers)
    again = [await client.post("/v1/images/generations", json=BODY, headers=headers) for _ in range(replays)]
    assert first.status_code == 200 and all(r.status_code == 200 for r in again)
    spent = Decimal(first.headers["x-klein-cost-usd"])
    assert spent > 0 and "idempotent-replayed" not in first.headers and "x-klein-original-cost-usd" not in first.headers
    for replay in again:
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["x-klein-cost-usd"] == "0"
        assert replay.headers["x-klein-original-cost-usd"] == first.headers["x-klein-cost-usd"]
        assert replay.content == first.content
    assert sum(f.calls.__len__() for f in client.fakes.values()) == 1, "a replay calls no backend"
    summed = sum((Decimal(r.headers["x-klein-cost-usd"]) for r in [first, *again]), Decimal(0))
    scraped = (await client.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})).text
    assert summed == spent == await _ledger_total(client.app) == _cost_metric(scraped)
