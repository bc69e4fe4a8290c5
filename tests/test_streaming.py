"""`stream: true`: OpenAI's image stream events from the gateway, with the same money as a plain answer.

The official openai SDK iterates the stream to its completed event; failover
before the first event is invisible; a failure after the stream began ends it
with an `error` event; a caller who disconnects mid-stream leaves the work to
run on and be settled. Every figure the completed event carries (`klein`)
equals the ledger row, the key's budget and klein_cost_usd_total.

The gateway runs in-process (uvicorn in a thread) over the emulators on
127.0.0.1, or over FakeAdapters.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar

import gateway.http.streaming as streaming
from gateway.dispatch.shutdown import Drain
from gateway.money.budgets import windows_at
from gateway.providers.base import FailureClass, ProviderError
from tests.emulators import EmulatorFleet
from tests.gateway_support import ENV, FakeAdapter, ServerThread, image_size_of, install_fakes, make_app, png_bytes, wait_until
from tests.test_abandoned_work import DAY_BUDGET, LOCAL_1MP, METRICS_TOKEN, REPLICATE_1MP, budget_spent, keys_file, ledger_rows, metric_total, settled

TEAM = {"authorization": "Bearer secret-team"}


def sse_events(lines: Iterator[str]) -> list[tuple[str, Any]]:
    """(event, data) for each SSE event, and ("comment", text) for each comment line."""
    out: list[tuple[str, Any]] = []
    name, data = None, []
    for line in lines:
        if line.startswith(":"):
            out.append(("comment", line[1:].strip()))
        elif line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif not line and (name or data):
            out.append((name or "message", json.loads("\n".join(data))))
            name, data = None, []
    return out


def stream_post(url: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    with httpx.stream("POST", f"{url}/v1/images/generations", json={**body, "stream": True}, headers=headers or TEAM, timeout=30) as answer:
        if answer.status_code != 200:
            answer.read()
            return answer, []
        return answer, sse_events(answer.iter_lines())


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread()
    yield fleet
    fleet.stop_thread()


@pytest.fixture
def emulated(fleet: EmulatorFleet, tmp_path: Path) -> Iterator[tuple[Litestar, ServerThread]]:
    fleet.reset()
    app = make_app({**ENV, **fleet.env(), "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}}))})
    with ServerThread(app) as server:
        yield app, server


def sdk(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="secret-team", max_retries=0)


def assert_money_agrees(app: Litestar, server: ServerThread, klein: dict[str, Any], status: int = 200) -> None:
    (row,) = ledger_rows(app)
    assert (row.status, row.backend, row.attempts) == (status, klein["backend"], klein["attempts"])
    assert Decimal(klein["cost_usd"]) == row.estimated_usd == budget_spent(app, "team") == metric_total(server.url, "klein_cost_usd_total") > 0


def test_the_openai_sdk_streams_a_generation_to_its_completed_event(emulated: tuple[Litestar, ServerThread]) -> None:
    app, server = emulated
    events = list(sdk(server).images.generate(model="flux-2-klein-4b", prompt="a lighthouse at dusk", size="768x512", stream=True, partial_images=2))
    # The cheapest backend is the (emulated) local GPU, which sends real previews of its denoising loop.
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    *previews, done = events
    assert [p.partial_image_index for p in previews] == [0, 1]
    assert all(p.b64_json and base64.b64decode(p.b64_json) != base64.b64decode(done.b64_json) for p in previews)
    assert all(p.output_format == "png" and p.created_at > 0 for p in previews)
    registry = app.state.gateway.metrics.registry
    assert registry.get_sample_value("klein_stream_previews_total", {"route": "generations"}) == 2
    assert registry.get_sample_value("klein_stream_first_event_seconds_count", {"route": "generations"}) == 1
    assert image_size_of(base64.b64decode(done.b64_json)) == (768, 512)
    assert (done.size, done.output_format, done.background, done.quality) == ("768x512", "png", "opaque", "auto")
    assert done.usage.total_tokens == 0 and done.created_at > 0
    klein = done.model_extra["klein"] if done.model_extra else done.klein  # type: ignore[attr-defined]
    assert klein["attempts"] == 1 and klein["request_id"].startswith("req_")
    assert wait_until(lambda: settled(app))
    assert_money_agrees(app, server, klein)


def test_the_openai_sdk_streams_an_edit_from_a_multipart_upload(emulated: tuple[Litestar, ServerThread]) -> None:
    app, server = emulated
    events = list(sdk(server).images.edit(model="flux-2-klein-4b", image=("ref.png", png_bytes(512, 512), "image/png"), prompt="make it blue", stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert image_size_of(base64.b64decode(events[-1].b64_json)) == (512, 512)
    assert wait_until(lambda: settled(app))
    (row,) = ledger_rows(app)
    assert (row.route, row.status) == ("edits", 200)


def test_n_images_stream_one_completed_event_each_in_order_with_the_request_totals(emulated: tuple[Litestar, ServerThread]) -> None:
    app, server = emulated
    answer, events = stream_post(server.url, {"prompt": "two foxes", "size": "512x512", "n": 2})
    assert answer.headers["content-type"].startswith("text/event-stream")
    done = [data for name, data in events if name == "image_generation.completed"]
    assert [d["image_index"] for d in done] == [0, 1]
    assert done[0]["klein"] == done[1]["klein"]  # the request's figures, on each event, not a share each
    assert wait_until(lambda: settled(app))
    assert_money_agrees(app, server, done[0]["klein"])
    assert ledger_rows(app)[0].images == 2


def test_fal_queue_status_and_position_arrive_as_comments_the_sdk_skips(fleet: EmulatorFleet, emulated: tuple[Litestar, ServerThread]) -> None:
    _, server = emulated
    assert httpx.post(f"{fleet['fal'].base_url}/_admin/knobs", json={"job": {"queue_ms": 700, "run_ms": 700}}, timeout=5).status_code == 200
    _, events = stream_post(server.url, {"prompt": "a fox", "size": "512x512", "model": "fal/flux-2-klein-4b"})
    progress = [json.loads(text.removeprefix("progress ")) for name, text in events if name == "comment" and text.startswith("progress ")]
    assert {"backend": "fal", "status": "IN_QUEUE", "queue_position": 0} in progress
    assert {"backend": "fal", "status": "IN_PROGRESS"} in [{k: v for k, v in p.items() if k != "queue_position"} for p in progress]
    assert events[-1][0] == "image_generation.completed"
    # The SDK parses the same stream: comments are skipped, the completed event arrives.
    done = list(sdk(server).images.generate(model="fal/flux-2-klein-4b", prompt="a fox", size="512x512", stream=True))
    assert [e.type for e in done] == ["image_generation.completed"]


def test_runflow_reports_its_run_status_as_comments(fleet: EmulatorFleet, emulated: tuple[Litestar, ServerThread]) -> None:
    """Replicate reports its prediction status the same way when it is polled; under `Prefer: wait`
    (its default here) the answer is held open until the prediction ends, so there is nothing to report."""
    _, server = emulated
    backend = "runflow"
    assert httpx.post(f"{fleet[backend].base_url}/_admin/knobs", json={"job": {"run_ms": 1200}}, timeout=5).status_code == 200
    _, events = stream_post(server.url, {"prompt": "a fox", "size": "512x512", "model": f"{backend}/flux-2-klein-4b"})
    progress = [json.loads(text.removeprefix("progress ")) for name, text in events if name == "comment" and text.startswith("progress ")]
    assert progress and all(p["backend"] == backend and p["status"] for p in progress), events[:-1]
    assert events[-1][0] == "image_generation.completed"


def fake_gateway(tmp_path: Path, fakes: dict[str, FakeAdapter]) -> Litestar:
    keys = keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}, "backends": {"only": sorted(fakes)}})
    app = make_app({**ENV, "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys)})
    install_fakes(app, fakes)
    return app


BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024"}


def test_failover_before_the_first_event_shows_only_the_backend_that_served(tmp_path: Path) -> None:
    fakes = {"local": FakeAdapter("local", [ProviderError(FailureClass.FAILED, "the GPU fell over")]), "replicate": FakeAdapter("replicate")}
    app = fake_gateway(tmp_path, fakes)
    with ServerThread(app) as server:
        answer, events = stream_post(server.url, BODY)
        assert answer.status_code == 200
        named = [(name, data) for name, data in events if name != "comment"]
        assert [name for name, _ in named] == ["image_generation.completed"]
        klein = named[0][1]["klein"]
        assert (klein["backend"], klein["attempts"], Decimal(klein["cost_usd"])) == ("replicate", 2, REPLICATE_1MP)
        assert wait_until(lambda: settled(app))
        assert_money_agrees(app, server, klein)


def test_a_failure_after_the_stream_began_ends_it_with_an_error_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.1)
    failed = ProviderError(FailureClass.FAILED, "the job failed")
    fakes = {"local": FakeAdapter("local", [failed], delay_s=0.5), "replicate": FakeAdapter("replicate", [failed], delay_s=0.5)}
    app = fake_gateway(tmp_path, fakes)
    with ServerThread(app) as server:
        answer, events = stream_post(server.url, BODY)
        assert answer.status_code == 200  # the stream began before the backends failed
        assert ("comment", "keep-alive") in events
        name, data = events[-1]
        assert name == "error"
        assert data["error"]["code"] == "all_backends_failed" and data["error"]["type"] == "server_error"
        assert [a["backend"] for a in data["error"]["attempts"]] == ["local", "replicate"]
        assert (data["klein"]["status"], data["klein"]["attempts"], data["klein"]["cost_usd"]) == (502, 2, "0")
        with pytest.raises(openai.APIError, match="every eligible backend failed"):
            list(sdk(server).images.generate(model="flux-2-klein-4b", prompt="a fox", stream=True))
        assert wait_until(lambda: settled(app))
        rows = ledger_rows(app)
        assert [(r.status, r.estimated_usd) for r in rows] == [(502, 0), (502, 0)]


def test_a_caller_who_disconnects_mid_stream_is_settled_at_the_real_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.1)
    fakes = {"local": FakeAdapter("local", [ProviderError(FailureClass.DELIVERY_FAILED, "the image could not be fetched")]), "replicate": FakeAdapter("replicate", delay_s=1.5)}
    app = fake_gateway(tmp_path, fakes)
    with ServerThread(app) as server:
        with httpx.stream("POST", f"{server.url}/v1/images/generations", json={**BODY, "stream": True}, headers=TEAM, timeout=30) as answer:
            first = next(answer.iter_lines())
            assert first == ": keep-alive"  # the stream is open, the work still running
        assert fakes["replicate"].calls, "the fallback had started"
        assert wait_until(lambda: settled(app), timeout=8), "the abandoned stream's work did not run to its end"
        (row,) = ledger_rows(app)
        assert (row.status, row.backend, row.attempts, row.images) == (499, "replicate", 2, 1)
        assert row.estimated_usd == LOCAL_1MP + REPLICATE_1MP == budget_spent(app, "team") == metric_total(server.url, "klein_cost_usd_total")
    assert fakes["replicate"].cancelled == []  # the paid work ran on
    assert app.state.gateway.metrics.registry.get_sample_value("klein_streams_ended_early_total", {"route": "generations"}) == 1


@pytest.mark.parametrize(
    ("headers", "param"),
    [({"idempotency-key": "stream-1"}, "Idempotency-Key"), ({"prefer": "respond-async"}, "stream")],
    ids=["idempotency_key", "respond_async"],
)
def test_a_stream_cannot_be_combined_with_a_replayed_or_async_answer(tmp_path: Path, headers: dict[str, str], param: str) -> None:
    fakes = {"local": FakeAdapter("local")}
    app = fake_gateway(tmp_path, fakes)
    with ServerThread(app) as server:
        answer, _ = stream_post(server.url, BODY, {**TEAM, **headers})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == param and answer.json()["error"]["code"] == "unsupported_parameter"
    assert fakes["local"].calls == []


def test_a_refusal_before_the_route_is_chosen_is_an_http_error(tmp_path: Path) -> None:
    fakes = {"local": FakeAdapter("local")}
    app = fake_gateway(tmp_path, fakes)
    with ServerThread(app) as server:
        answer, _ = stream_post(server.url, {**BODY, "model": "replicate/flux-2-klein-4b"})  # the key may only use local
        assert answer.status_code >= 400 and answer.headers["content-type"].startswith("application/json")


def test_a_caller_who_leaves_before_a_provider_has_the_work_stops_it_at_no_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.1)
    fakes = {"local": FakeAdapter("local")}
    app = fake_gateway(tmp_path, fakes)
    gw = app.state.gateway
    stopped: list[bool] = []

    async def never_handed_over(*args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep(30)  # still before any provider call (Progress.handed_over stays False)
        except asyncio.CancelledError:
            stopped.append(True)
            raise

    monkeypatch.setattr(gw, "dispatch", never_handed_over)
    with ServerThread(app) as server:
        with httpx.stream("POST", f"{server.url}/v1/images/generations", json={**BODY, "stream": True}, headers=TEAM, timeout=30) as answer:
            assert next(answer.iter_lines()) == ": keep-alive"
        assert wait_until(lambda: settled(app), timeout=5), "the stream's work was not stopped"
        (row,) = ledger_rows(app)
        assert (row.status, row.attempts, row.estimated_usd) == (499, 0, 0)
        assert budget_spent(app, "team") == 0
    assert stopped == [True] and fakes["local"].calls == []


async def test_a_shutdown_past_its_grace_ends_the_stream_with_an_error_and_keeps_the_spend(tmp_path: Path) -> None:
    fakes = {"local": FakeAdapter("local", [ProviderError(FailureClass.DELIVERY_FAILED, "the image could not be fetched")]), "replicate": FakeAdapter("replicate", delay_s=30.0)}
    app = fake_gateway(tmp_path, fakes)
    gw = app.state.gateway
    gw.drain = Drain(grace_s=0.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
        request = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "stream": True}, headers=TEAM))
        for _ in range(200):
            if fakes["replicate"].calls:
                break
            await asyncio.sleep(0.01)
        assert fakes["replicate"].calls, "the fallback never started"
        assert await gw.drain.settle(lambda: gw.in_flight, poll_s=0.01) == 1
        answer = await request
        events = sse_events(iter(answer.text.splitlines()))
        name, data = events[-1]
        assert (answer.status_code, name, data["error"]["code"]) == (200, "error", "shutting_down")
        for _ in range(100):
            if not gw.follow_ups:
                break
            await asyncio.sleep(0.01)
        now = datetime.now(UTC)
        (row,) = await gw.billing.ledger.query(now - timedelta(hours=1), now + timedelta(hours=1))
        (units,) = await gw.billing.budgets.spent("team", windows_at([("day", DAY_BUDGET)], now))
    assert (row.status, row.estimated_usd, row.attempts) == (503, LOCAL_1MP, 1)
    assert Decimal(units) * Decimal("0.00000001") == LOCAL_1MP
