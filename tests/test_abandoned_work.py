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
import time
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
from gateway.providers.base import FailureClass, ProviderError, note_job_id
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
    """The ledger's rows, read on the loop that serves `app`: the writer's asyncio lock
    belongs to that loop, and a waiter from another loop may never be woken."""
    ledger = app.state.gateway.billing.ledger
    now = datetime.now(UTC)
    query = ledger.query(now - timedelta(hours=1), now + timedelta(hours=1))
    task = ledger._task
    if task is None or task.get_loop().is_closed():  # not serving: no loop of its own
        return asyncio.run(query)
    return asyncio.run_coroutine_threadsafe(query, task.get_loop()).result(timeout=10)


METRICS_TOKEN = "abandoned-work-metrics-token"  # caller keys are required, so /metrics is closed without it


def metric_total(url: str, name: str, backend: str | None = None) -> Decimal:
    text = httpx.get(f"{url}/metrics", timeout=5, headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
    lines = [line for line in text.splitlines() if line.startswith(name + "{") and (backend is None or f'backend="{backend}"' in line)]
    return sum((Decimal(line.rsplit(" ", 1)[1]) for line in lines), Decimal(0))


def settled(app: Litestar) -> bool:
    """Nothing of the abandoned request is left to settle: no request in flight, no
    follow-up of a provider job (Gateway.busy); its tab and ledger row are written."""
    return app.state.gateway.busy == 0


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


# ---- the caller's deadline and the owner's cancel: the two other ways a caller stops waiting ----


# Runflow's expected latency (providers.yaml) is 3 s: a deadline above it is routed there, and a run
# that takes longer than the deadline is still running when it passes.
DEADLINE_MS = "3500"


def slow_runflow(fleet: EmulatorFleet) -> None:
    assert httpx.post(f"{fleet['runflow'].base_url}/_admin/knobs", json={"job": {"run_ms": 5000}}, timeout=5).status_code == 200


def test_a_deadline_that_passes_while_the_provider_runs_is_answered_then_settled_at_the_real_cost(fleet: EmulatorFleet, runflow_gateway: tuple[Litestar, ServerThread]) -> None:
    """Runflow has no cancel: its run goes on past the 1 s deadline and is billed. The caller
    gets its 504 at the deadline; the budget, the ledger and the metrics get the real cost."""
    app, server = runflow_gateway
    slow_runflow(fleet)
    t0 = time.monotonic()
    answer = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers={**TEAM, "x-klein-deadline-ms": DEADLINE_MS}, timeout=10)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "deadline_exceeded", answer.text
    assert time.monotonic() - t0 < 4.5  # answered at the deadline, not when the run ended
    assert answer.headers["x-klein-possibly-billed-usd"] != "0"
    assert wait_until(lambda: settled(app), timeout=8), "the provider job was not followed to its end"
    (row,) = ledger_rows(app)
    assert paid_calls(fleet, "runflow") == 1
    assert (row.status, row.backend, row.images) == (504, "runflow", 1)  # the image was made, after the answer
    assert row.estimated_usd > 0 and row.billed_usd is not None and row.billed_usd > 0  # Runflow's own figure: it billed
    assert budget_spent(app, "team") == row.estimated_usd == metric_total(server.url, "klein_cost_usd_total")
    assert metric_total(server.url, "klein_possibly_billed_usd_total") == 0  # learnt, not guessed


def test_a_deadline_answer_with_an_idempotency_key_keeps_the_image_made_after_it_for_the_retry(fleet: EmulatorFleet, runflow_gateway: tuple[Litestar, ServerThread]) -> None:
    app, server = runflow_gateway
    slow_runflow(fleet)
    headers = {**TEAM, "idempotency-key": "deadline-1", "x-klein-deadline-ms": DEADLINE_MS}
    first = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=headers, timeout=10)
    assert first.status_code == 504
    meanwhile = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=headers, timeout=10)
    assert meanwhile.status_code == 409 and meanwhile.json()["error"]["code"] == "idempotency_key_in_use"
    assert wait_until(lambda: settled(app), timeout=8)
    retry = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=headers, timeout=10)
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true" and retry.json()["data"][0]["url"]
    assert paid_calls(fleet, "runflow") == 1  # neither the retry nor the one in between paid again
    rows = {r.status: r for r in ledger_rows(app)}
    assert rows[504].estimated_usd > 0 and rows[200].estimated_usd == 0
    assert budget_spent(app, "team") == rows[504].estimated_usd == metric_total(server.url, "klein_cost_usd_total")
    assert Decimal(retry.headers["x-klein-original-cost-usd"]) == rows[504].estimated_usd


def test_a_job_still_queued_at_the_provider_when_the_deadline_passes_is_cancelled_and_costs_nothing(fleet: EmulatorFleet, tmp_path: Path) -> None:
    """fal removes a queued request on cancel: the follow-up learns it was never billed."""
    fleet.reset()
    app = make_app({**ENV, **fleet.env(), "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}}))})
    assert httpx.post(f"{fleet['fal'].base_url}/_admin/knobs", json={"job": {"queue_ms": 5000}}, timeout=5).status_code == 200
    with ServerThread(app) as server:
        # 1.9 s: above fal's expected 1.5 s, and too short for fal's own start timeout (whole seconds above one)
        answer = httpx.post(f"{server.url}/v1/images/generations", json={**BODY, "model": "fal/flux-2-klein-4b"}, headers={**TEAM, "x-klein-deadline-ms": "1900"}, timeout=10)
        assert answer.status_code == 504, answer.text
        assert wait_until(lambda: settled(app), timeout=8)
        (row,) = ledger_rows(app)
        stats = httpx.get(f"{fleet['fal'].base_url}/_admin/stats", timeout=5).json()
        assert (stats["paid_calls"], stats["cancels"]) == (1, 1)
        assert (row.status, row.estimated_usd) == (504, 0)
        assert budget_spent(app, "team") == 0 == metric_total(server.url, "klein_cost_usd_total")
        assert metric_total(server.url, "klein_possibly_billed_usd_total") == 0


def submit_job(url: str, body: dict, headers: dict[str, str]) -> dict:
    resp = httpx.post(f"{url}/v1/images/generations", json=body, headers={**headers, "prefer": "respond-async"}, timeout=10)
    assert resp.status_code == 202, resp.text
    return resp.json()


def job_of(url: str, job_id: str, headers: dict[str, str]) -> dict:
    return httpx.get(f"{url}/v1/images/jobs/{job_id}", headers=headers, timeout=5).json()


def job_rows(app: Litestar) -> list[Any]:
    """The ledger rows of job runs (the 202 that accepted the job has its own row, at 0)."""
    return [r for r in ledger_rows(app) if r.route.endswith("_async")]


def test_a_job_cancelled_while_its_provider_runs_ends_canceled_at_the_real_cost_with_no_further_attempt(fleet: EmulatorFleet, runflow_gateway: tuple[Litestar, ServerThread]) -> None:
    """The cancel stops new spend, not paid work: Runflow's run ends and is billed, the job ends
    `canceled` with that cost, and the reservation is settled only then (budget = ledger = metrics)."""
    app, server = runflow_gateway
    job = submit_job(server.url, PINNED, TEAM)
    assert wait_until(lambda: paid_calls(fleet, "runflow") == 1, timeout=5)
    cancel = httpx.post(f"{server.url}/v1/images/jobs/{job['id']}/cancel", headers=TEAM, timeout=10)
    assert cancel.status_code == 200
    assert cancel.json()["status"] == "running" and cancel.json()["cancel_requested_at"] is not None  # the run it paid for goes on
    assert wait_until(lambda: job_of(server.url, job["id"], TEAM)["status"] == "canceled", timeout=8)
    assert wait_until(lambda: len(job_rows(app)) == 1, timeout=3)
    done = job_of(server.url, job["id"], TEAM)
    (row,) = job_rows(app)
    assert paid_calls(fleet, "runflow") == 1 and row.backend == "runflow" and row.attempts == 1
    assert Decimal(done["cost_usd"]) == row.estimated_usd > 0
    assert done["result"]["data"][0]["url"]  # the image was paid for, so it is the owner's
    assert budget_spent(app, "team") == row.estimated_usd == metric_total(server.url, "klein_cost_usd_total")


def test_a_job_cancelled_before_any_provider_call_ends_canceled_at_once_for_nothing(tmp_path: Path) -> None:
    app = make_app({**ENV, "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}, "backends": {"only": ["local"]}}))})
    fakes = {"local": FakeAdapter("local", delay_s=5.0)}
    install_fakes(app, fakes)

    async def held_before_dispatch(job: Any, **kwargs: Any) -> Any:  # the run waits before any provider is called
        await asyncio.sleep(30)
        raise AssertionError("the cancel should have stopped the run first")

    app.state.gateway.images = held_before_dispatch
    with ServerThread(app) as server:
        job = submit_job(server.url, BODY, TEAM)
        assert wait_until(lambda: job_of(server.url, job["id"], TEAM)["status"] == "running", timeout=5)
        cancel = httpx.post(f"{server.url}/v1/images/jobs/{job['id']}/cancel", headers=TEAM, timeout=10)
        assert cancel.status_code == 200 and cancel.json()["status"] == "canceled", cancel.json()
        assert cancel.json()["cost_usd"] == "0"
        assert fakes["local"].calls == []
        assert wait_until(lambda: len(job_rows(app)) == 1, timeout=3)
        (row,) = job_rows(app)
        assert (row.status, row.estimated_usd) == (499, 0) and budget_spent(app, "team") == 0


class SubmittingAdapter(FakeAdapter):
    """A fake that hands the provider a job (its id noted, as real adapters do) and then waits on it."""

    async def generate(self, job: Any, deadline: float) -> Any:
        note_job_id("pred-running", self.name)
        return await super().generate(job, deadline)


async def test_a_shutdown_that_cuts_a_submitted_job_reports_it_as_possibly_billed_and_keeps_the_key(tmp_path: Path) -> None:
    """Past the grace the provider job is cancelled, but it may have started: the 503 says what is at
    stake, the metric counts it, and the Idempotency-Key keeps that answer so a retry cannot pay twice."""
    app = make_app({**ENV, "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}, "backends": {"only": ["replicate"]}}))})
    fakes = {"replicate": SubmittingAdapter("replicate", delay_s=30.0)}
    install_fakes(app, fakes)
    gw = app.state.gateway
    gw.drain = Drain(grace_s=0.0)
    headers = {**TEAM, "idempotency-key": "cut-1"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        request = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "response_format": "b64_json"}, headers=headers))
        for _ in range(200):
            if fakes["replicate"].calls:
                break
            await asyncio.sleep(0.01)
        assert await gw.drain.settle(lambda: gw.busy, poll_s=0.01) == 1
        answer = await request
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert Decimal(answer.headers["x-klein-possibly-billed-usd"]) == REPLICATE_1MP
        gw.drain = Drain(grace_s=25.0)
        replay = await client.post("/v1/images/generations", json={**BODY, "response_format": "b64_json"}, headers=headers)
    assert replay.status_code == 503 and replay.headers["idempotent-replayed"] == "true"
    assert len(fakes["replicate"].calls) == 1  # the replay bought nothing
    assert Decimal(str(gw.metrics.registry.get_sample_value("klein_possibly_billed_usd_total", {"backend": "replicate"}) or 0)) == REPLICATE_1MP


def test_a_caller_who_leaves_before_any_provider_is_called_stops_the_work_for_nothing(tmp_path: Path) -> None:
    """Planning is held up; the caller leaves; nothing reaches a provider and nothing is reserved or charged."""
    app = make_app({**ENV, "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}, "backends": {"only": ["local"]}}))})
    fakes = {"local": FakeAdapter("local")}
    install_fakes(app, fakes)
    gw = app.state.gateway
    plan = gw.plan

    async def slow_plan(job: Any) -> Any:
        await asyncio.sleep(1.5)
        return await plan(job)

    gw.plan = slow_plan
    with ServerThread(app) as server:
        send_then_abandon(server.url, BODY, after_s=0.5, headers=TEAM)
        assert wait_until(lambda: settled(app) and len(ledger_rows(app)) == 1, timeout=5)
        (row,) = ledger_rows(app)
        time.sleep(1.5)  # the held plan would have finished by now
        assert fakes["local"].calls == []
        assert (row.status, row.estimated_usd, row.attempts) == (499, 0, 0)
        assert budget_spent(app, "team") == 0 == metric_total(server.url, "klein_cost_usd_total")
