"""Work its caller abandons after a provider was called runs on, and its money is settled.

A caller who disconnects while the provider job runs no longer cancels it:
the job runs to its end, and what it cost reaches the key's budget, the
ledger (status 499: the caller never got the answer, with the real cost) and
klein_cost_usd_total exactly as if the caller had stayed. With an
Idempotency-Key the real answer is kept, so a retry replays the image and
pays nobody again. A shutdown that cancels dispatch after a billed attempt
keeps that attempt's cost everywhere too.

The gateway runs in-process (uvicorn in a thread) over the emulators on
127.0.0.1, or over FakeAdapters; the caller is a raw socket closed mid-request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from litestar import Litestar

from gateway.dispatch.shutdown import Drain
from gateway.money.budgets import windows_at
from gateway.money.keys import hash_key
from gateway.providers.base import FailureClass, ProviderError
from tests.emulators import EmulatorFleet
from tests.gateway_support import ENV, FakeAdapter, ServerThread, install_fakes, make_app, send_then_abandon, wait_until

BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "url"}
DAY_BUDGET = Decimal("0.05")
LOCAL_1MP = Decimal("0.00041506")  # the local sheet at 1024x1024 (tests/test_billing.py)
REPLICATE_1MP = Decimal("0.00104858")


def keys_file(tmp_path: Path, **keys: dict) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": name, "key_sha256": hash_key(f"secret-{name}"), **spec} for name, spec in keys.items()]}))
    return path


def budget_spent(app: Litestar, key: str) -> Decimal:
    windows = windows_at([("day", DAY_BUDGET)], datetime.now(UTC))
    (units,) = asyncio.run(app.state.gateway.billing.budgets.spent(key, windows))  # MemoryBudgets: thread-safe
    return Decimal(units) * Decimal("0.00000001")


def ledger_rows(app: Litestar) -> list[Any]:
    now = datetime.now(UTC)
    return asyncio.run(app.state.gateway.billing.ledger.query(now - timedelta(hours=1), now + timedelta(hours=1)))


METRICS_TOKEN = "abandoned-work-metrics-token"  # caller keys are required, so /metrics is closed without it


def metric_total(url: str, name: str, backend: str | None = None) -> Decimal:
    text = httpx.get(f"{url}/metrics", timeout=5, headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
    lines = [line for line in text.splitlines() if line.startswith(name + "{") and (backend is None or f'backend="{backend}"' in line)]
    return sum((Decimal(line.rsplit(" ", 1)[1]) for line in lines), Decimal(0))


def settled(app: Litestar) -> bool:
    """The abandoned request's handler finished: its tab was settled and its ledger row written."""
    return app.state.gateway.in_flight == 0


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread()
    yield fleet
    fleet.stop_thread()


@pytest.fixture
def runflow_gateway(fleet: EmulatorFleet, tmp_path: Path) -> Iterator[tuple[Litestar, ServerThread]]:
    """A gateway over the emulators with key `team` (a $0.05 day); Runflow's jobs take 2.5 s."""
    fleet.reset()
    app = make_app({**ENV, **fleet.env(), "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}}))})
    resp = httpx.post(f"{fleet['runflow'].base_url}/_admin/knobs", json={"job": {"run_ms": 2500}}, timeout=5)
    assert resp.status_code == 200, resp.text
    with ServerThread(app) as server:
        yield app, server


def paid_calls(fleet: EmulatorFleet, backend: str) -> int:
    return httpx.get(f"{fleet[backend].base_url}/_admin/stats", timeout=5).json()["paid_calls"]


PINNED = {**BODY, "model": "runflow/flux-2-klein-4b"}
TEAM = {"authorization": "Bearer secret-team"}


def test_a_caller_who_leaves_while_the_provider_runs_is_billed_the_real_cost_everywhere(fleet: EmulatorFleet, runflow_gateway: tuple[Litestar, ServerThread]) -> None:
    app, server = runflow_gateway
    send_then_abandon(server.url, PINNED, after_s=0.8, headers=TEAM)
    assert wait_until(lambda: settled(app), timeout=8), "the abandoned job did not run to its end"
    rows = ledger_rows(app)
    assert len(rows) == 1, [(r.route, r.status, r.key_name, r.backend, r.estimated_usd) for r in rows]
    (row,) = rows
    assert paid_calls(fleet, "runflow") == 1
    assert (row.status, row.backend, row.images) == (499, "runflow", 1)
    assert row.estimated_usd > 0
    assert row.billed_usd is not None and row.billed_usd > 0  # Runflow's own figure came back: it billed
    assert budget_spent(app, "team") == row.estimated_usd == metric_total(server.url, "klein_cost_usd_total")
    assert metric_total(server.url, "klein_billed_usd_total", "runflow") == row.billed_usd
    assert httpx.get(f"{fleet['runflow'].base_url}/_admin/stats", timeout=5).json()["cancels"] == 0


def test_an_abandoned_request_with_an_idempotency_key_keeps_the_image_for_the_retry(fleet: EmulatorFleet, runflow_gateway: tuple[Litestar, ServerThread]) -> None:
    app, server = runflow_gateway
    headers = {**TEAM, "idempotency-key": "lighthouse-1"}
    send_then_abandon(server.url, PINNED, after_s=0.8, headers=headers)
    assert wait_until(lambda: settled(app), timeout=8)
    retry = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=headers, timeout=15)
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["data"][0]["url"]
    assert paid_calls(fleet, "runflow") == 1  # the retry paid nobody
    abandoned, replayed = ledger_rows(app)
    assert (abandoned.status, replayed.status, replayed.estimated_usd) == (499, 200, 0)
    assert budget_spent(app, "team") == abandoned.estimated_usd == metric_total(server.url, "klein_cost_usd_total") > 0


def test_a_billed_delivery_failure_then_a_disconnect_during_the_fallback_settles_both_attempts(tmp_path: Path) -> None:
    app = make_app(
        {**ENV, "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}, "backends": {"only": ["local", "replicate"]}}))}
    )
    fakes = {
        "local": FakeAdapter("local", [ProviderError(FailureClass.DELIVERY_FAILED, "the image could not be fetched")]),
        "replicate": FakeAdapter("replicate", delay_s=2.0),
    }
    install_fakes(app, fakes)
    with ServerThread(app) as server:
        send_then_abandon(server.url, BODY, after_s=0.8, headers=TEAM)
        assert wait_until(lambda: settled(app), timeout=8)
        (row,) = ledger_rows(app)
        assert (row.status, row.backend, row.attempts) == (499, "replicate", 2)
        assert row.estimated_usd == LOCAL_1MP + REPLICATE_1MP
        assert budget_spent(app, "team") == row.estimated_usd == metric_total(server.url, "klein_cost_usd_total")
    assert fakes["replicate"].cancelled == []


async def test_a_shutdown_that_cancels_dispatch_keeps_the_spend_already_billed(tmp_path: Path) -> None:
    """The grace ends while the fallback runs: 503, and the billed first attempt is still owed."""
    app = make_app(
        {**ENV, "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}, "backends": {"only": ["local", "replicate"]}}))}
    )
    fakes = {
        "local": FakeAdapter("local", [ProviderError(FailureClass.DELIVERY_FAILED, "the image could not be fetched")]),
        "replicate": FakeAdapter("replicate", delay_s=30.0),
    }
    install_fakes(app, fakes)
    gw = app.state.gateway
    gw.drain = Drain(grace_s=0.0)
    # httpx's ASGI transport runs the app on this loop (litestar's test client blocks it while a request runs).
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        request = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "response_format": "b64_json"}, headers=TEAM))
        for _ in range(200):
            if fakes["replicate"].calls:
                break
            await asyncio.sleep(0.01)
        assert fakes["replicate"].calls, "the fallback never started"
        assert await gw.drain.settle(lambda: gw.in_flight, poll_s=0.01) == 1
        answer = await request
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        now = datetime.now(UTC)
        (row,) = await gw.billing.ledger.query(now - timedelta(hours=1), now + timedelta(hours=1))
        (units,) = await gw.billing.budgets.spent("team", windows_at([("day", DAY_BUDGET)], now))
    assert (row.status, row.estimated_usd, row.attempts) == (503, LOCAL_1MP, 1)  # the attempt that finished; the cancelled one is not counted
    assert Decimal(units) * Decimal("0.00000001") == LOCAL_1MP
    assert Decimal(str(gw.metrics.registry.get_sample_value("klein_cost_usd_total", {"backend": "local", "caller": "team"}) or 0)) == LOCAL_1MP
