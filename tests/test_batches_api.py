"""/v1/batches: OpenAI's Batch API for images, scheduled across the local GPU and hosted backends.

The official openai SDK, unchanged, uploads a batch file, creates a batch,
polls it and downloads its output and error files from a gateway served by
uvicorn, whose backends are scripted fakes (real prices and capabilities), so
every paid call is counted. A bad line fails alone into the error file; every
completed line costs no more than its quote; cancel ends a batch `cancelled`
with fewer lines done and settles the lines that ran; the quote plans the
local GPU for what it can finish in the window and spills the rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_support import ENV, FakeAdapter, ServerThread, install_fakes, make_app
from tests.test_abandoned_work import ledger_rows

KEY_A, KEY_B = "sk-batch-key-a-0000", "sk-batch-key-b-0000"
KEYED = {**ENV, "KLEIN_GATEWAY_KEYS": f"{KEY_A},{KEY_B}"}
HOSTED = ("fal", "replicate", "runflow", "empiriolabs")


def lines_file(bodies: list[dict[str, Any]], *, url: str = "/v1/images/generations") -> bytes:
    return b"".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}).encode() + b"\n" for i, body in enumerate(bodies))


class Rig:
    def __init__(self, local_delay_s: float = 0.0, local_outcomes: list[Any] | None = None) -> None:
        self.fakes = {"local": FakeAdapter("local", local_outcomes, delay_s=local_delay_s), **{name: FakeAdapter(name) for name in HOSTED}}
        self.app = make_app(KEYED)
        install_fakes(self.app, self.fakes)
        self.server = ServerThread(self.app)

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def sdk(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key, max_retries=0)

    def calls(self) -> dict[str, int]:
        return {name: len(fake.calls) for name, fake in self.fakes.items()}

    def submit(self, data: bytes, *, window: str = "24h", key: str = KEY_A, **extra: Any) -> Any:
        client = self.sdk(key)
        uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
        return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window=window, **extra)  # type: ignore[arg-type]

    def wait(self, batch_id: str, *, timeout: float = 30.0, key: str = KEY_A) -> Any:
        client = self.sdk(key)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            batch = client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return batch
            time.sleep(0.1)
        raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout:g}s")

    def file_lines(self, file_id: str | None, key: str = KEY_A) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        return [json.loads(line) for line in self.sdk(key).files.content(file_id).read().splitlines()]


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    with r.server:
        yield r


def test_the_official_sdk_runs_a_batch_with_one_bad_line_that_fails_alone(rig: Rig) -> None:
    bodies = [{"prompt": f"a lighthouse, take {i}", "size": "512x512"} for i in range(4)]
    bodies.insert(2, {"prompt": "too small", "size": "13x13"})
    batch = rig.submit(lines_file(bodies), metadata={"job": "catalogue"})
    assert (batch.object, batch.status, batch.endpoint, batch.completion_window) == ("batch", "validating", "/v1/images/generations", "24h")
    assert batch.metadata == {"job": "catalogue"} and batch.expires_at == batch.created_at + 86400

    done = rig.wait(batch.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 4, 1)
    assert done.in_progress_at is not None and done.finalizing_at is not None and done.completed_at is not None

    out = rig.file_lines(done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == ["req-0", "req-1", "req-3", "req-4"]
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and len(response["body"]["data"]) == 1
        assert response["headers"]["x-klein-backend"] == "local"  # a 24 h window: the GPU does it all
        assert response["request_id"] == response["headers"]["x-request-id"]
    errors = rig.file_lines(done.error_file_id)
    assert [line["custom_id"] for line in errors] == ["req-2"]
    bad = errors[0]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "size" and bad["body"]["error"]["type"] == "invalid_request_error"

    assert rig.calls()["local"] == 4 and sum(rig.calls()[n] for n in HOSTED) == 0  # the bad line paid nobody
    output_file = rig.sdk().files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.filename == f"{done.id}_output.jsonl"


def test_every_completed_line_costs_no_more_than_its_quote_and_the_figures_add_up(rig: Rig) -> None:
    bodies = [{"prompt": f"variant {i}", "size": size} for i, size in enumerate(["512x512", "1024x1024", "768x1024", "1024x768"])]
    done = rig.wait(rig.submit(lines_file(bodies)).id)
    assert done.status == "completed"
    quotes = {q["custom_id"]: q for q in done.model_extra["klein"]["quote"]["lines"]}
    total = Decimal(0)
    for line in rig.file_lines(done.output_file_id):
        cost = Decimal(line["response"]["headers"]["x-klein-cost-usd"])
        quote = quotes[line["custom_id"]]
        cheapest = min(Decimal(q) for q in (quote["local_usd"], quote["hosted_usd"]) if q is not None)
        assert cost <= cheapest, (line["custom_id"], cost, quote)
        total += cost
    assert Decimal(done.model_extra["klein"]["spent_usd"]) == total
    rows = [r for r in ledger_rows(rig.app) if r.route == "generations_async"]
    assert len(rows) == 4 and sum((r.estimated_usd for r in rows), Decimal(0)) == total  # the ledger says what the output file says


def test_cancel_ends_the_batch_cancelled_with_fewer_lines_done_and_settles_what_ran() -> None:
    rig = Rig(local_delay_s=0.6)
    with rig.server:
        bodies = [{"prompt": f"frame {i}", "size": "512x512"} for i in range(24)]
        batch = rig.submit(lines_file(bodies))
        client = rig.sdk()
        end = time.monotonic() + 20
        while time.monotonic() < end and client.batches.retrieve(batch.id).request_counts.completed < 2:
            time.sleep(0.05)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        done = rig.wait(batch.id)
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert 2 <= done.request_counts.completed < 24
        out = rig.file_lines(done.output_file_id)
        errors = rig.file_lines(done.error_file_id)
        assert len(out) == done.request_counts.completed
        assert {line["custom_id"] for line in out} | {line["custom_id"] for line in errors} == {f"req-{i}" for i in range(24)}
        assert all(line["error"]["code"] == "batch_cancelled" for line in errors if line["response"] is None)
        paid = rig.calls()["local"]
        time.sleep(1.5)
        assert rig.calls()["local"] == paid  # nothing starts after the cancel has ended the batch
        assert Decimal(done.model_extra["klein"]["spent_usd"]) == sum((Decimal(line["response"]["headers"]["x-klein-cost-usd"]) for line in out), Decimal(0)) + sum(
            (Decimal(line["error"].get("cost_usd", "0")) for line in errors if line["response"] is None), Decimal(0)
        )
        with pytest.raises(openai.BadRequestError):
            client.batches.cancel(rig.wait(rig.submit(lines_file(bodies[:1])).id).id)  # an ended batch has nothing to cancel


def test_a_batch_belongs_to_the_key_that_made_it(rig: Rig) -> None:
    batch = rig.submit(lines_file([{"prompt": "mine", "size": "512x512"}]))
    with pytest.raises(openai.NotFoundError):
        rig.sdk(KEY_B).batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        rig.sdk(KEY_B).batches.cancel(batch.id)
    assert [b.id for b in rig.sdk(KEY_B).batches.list()] == []
    assert [b.id for b in rig.sdk().batches.list()] == [batch.id]
    rig.wait(batch.id)


def test_listing_pages_newest_first_with_after_and_limit(rig: Rig) -> None:
    made = [rig.submit(lines_file([{"prompt": f"p{i}", "size": "512x512"}])).id for i in range(3)]
    for batch_id in made:
        rig.wait(batch_id)
    client = rig.sdk()
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2, after=first.data[-1].id).data] == made[:1]
    assert [b.id for b in client.batches.list(limit=1)] == made[::-1]  # the SDK follows `after` page by page


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/images/generations", "completion_window": "48h"}, "completion_window"),
        ({"endpoint": "/v1/images/generations", "completion_window": "2m"}, "completion_window"),
        ({"endpoint": "/v1/images/generations", "completion_window": 24}, "completion_window"),
        ({"endpoint": "/v1/images/generations", "completion_window": "24h", "metadata": {"k": 1}}, "metadata"),
    ],
    ids=["chat-endpoint", "window-over-24h", "window-under-5m", "window-not-text", "metadata-not-strings"],
)
def test_a_bad_batch_request_is_a_400_naming_its_parameter(rig: Rig, body: dict[str, Any], param: str) -> None:
    uploaded = rig.sdk().files.create(file=("requests.jsonl", lines_file([{"prompt": "x"}])), purpose="batch")
    resp = httpx.post(f"{rig.server.url}/v1/batches", json={"input_file_id": uploaded.id, **body}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_batch_of_a_file_that_is_not_the_callers_or_not_for_batches_is_refused(rig: Rig) -> None:
    theirs = rig.sdk(KEY_B).files.create(file=("requests.jsonl", lines_file([{"prompt": "x"}])), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        rig.sdk().batches.create(input_file_id=theirs.id, endpoint="/v1/images/generations", completion_window="24h")
    image = rig.sdk().files.create(file=("ref.png", b"\x89PNG opaque"), purpose="vision")
    with pytest.raises(openai.BadRequestError) as refused:
        rig.sdk().batches.create(input_file_id=image.id, endpoint="/v1/images/generations", completion_window="24h")
    assert refused.value.code == "invalid_file_purpose"


def test_the_quote_plans_the_gpu_for_what_fits_the_window_and_spills_the_rest(rig: Rig) -> None:
    """1024x1024 x4 is 4.2 MP of GPU work a line; the local price sheet's 0.57 s per MP
    gives 1.75 MP/s, so a 5-minute window less its 60 s margin holds about 100 such lines."""
    uploaded = rig.sdk().files.create(file=("requests.jsonl", lines_file([{"prompt": f"p{i}", "size": "1024x1024", "n": 4} for i in range(150)])), purpose="batch")
    headers = {"Authorization": f"Bearer {KEY_A}"}

    def quote(window: str) -> dict[str, Any]:
        resp = httpx.post(f"{rig.server.url}/v1/batches/quote", json={"input_file_id": uploaded.id, "endpoint": "/v1/images/generations", "completion_window": window}, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    short, long = quote("5m"), quote("24h")
    assert (long["lines_local"], long["lines_hosted"]) == (150, 0)
    assert 90 <= short["lines_local"] <= 110 and short["lines_local"] + short["lines_hosted"] == 150
    assert Decimal(long["total_usd"]) < Decimal(short["total_usd"]) < Decimal(short["all_hosted_usd"])
    assert Decimal(long["total_usd"]) == Decimal(long["all_local_usd"])
    assert len(short["lines"]) == 150 and all(q["hosted_usd"] is not None and q["local_usd"] is not None for q in short["lines"])
    assert rig.calls() == {name: 0 for name in rig.fakes}  # a quote pays nobody


def test_lines_the_gpu_cannot_finish_in_the_window_spill_to_the_cheapest_hosted_backend(rig: Rig) -> None:
    bodies = [{"prompt": f"p{i}", "size": "1024x1024", "n": 4} for i in range(150)]
    done = rig.wait(rig.submit(lines_file(bodies), window="5m").id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 150
    klein = done.model_extra["klein"]
    assert klein["lines_hosted"] > 0 and klein["lines_local"] > 0
    backends = {line["response"]["headers"]["x-klein-backend"] for line in rig.file_lines(done.output_file_id)}
    cheapest_hosted = {q["hosted_backend"] for q in klein["quote"]["lines"]}
    assert backends - {"local"} <= cheapest_hosted
    assert sum(rig.calls().values()) == 150  # every line paid once


def test_batch_events_stream_every_change_and_end_with_the_terminal_batch(rig: Rig) -> None:
    batch = rig.submit(lines_file([{"prompt": f"p{i}", "size": "512x512"} for i in range(3)]))
    events: list[tuple[int, dict[str, Any]]] = []
    with httpx.stream("GET", f"{rig.server.url}/v1/batches/{batch.id}/events", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in resp.iter_lines():
            if line.startswith(("id:", "data:")):
                key, _, value = line.partition(": ")
                current[key] = value
            elif not line and "data" in current:
                events.append((int(current["id"]), json.loads(current["data"])))
                current = {}
    versions = [v for v, _ in events]
    assert versions == sorted(set(versions))
    assert events[-1][1]["status"] == "completed" and events[-1][1]["request_counts"]["completed"] == 3
    resumed = httpx.get(f"{rig.server.url}/v1/batches/{batch.id}/events", headers={"Authorization": f"Bearer {KEY_A}", "Last-Event-ID": str(versions[-1])})
    assert resumed.status_code == 204  # already holding the end: nothing more to send


def test_lines_whose_local_run_fails_fall_over_to_a_hosted_backend() -> None:
    from gateway.providers.base import FailureClass, ProviderError

    rig = Rig(local_outcomes=[ProviderError(FailureClass.UNREACHABLE, "gpu fell over")])
    with rig.server:
        done = rig.wait(rig.submit(lines_file([{"prompt": f"p{i}", "size": "512x512"} for i in range(3)])).id)
        assert done.status == "completed" and done.request_counts.completed == 3
        assert {line["response"]["headers"]["x-klein-backend"] for line in rig.file_lines(done.output_file_id)} <= set(HOSTED)


def test_an_edit_batch_takes_its_reference_images_as_file_ids_of_the_callers_uploads(rig: Rig) -> None:
    from tests.gateway_support import png_bytes

    client = rig.sdk()
    reference = client.files.create(file=("shoe.png", png_bytes(512, 512)), purpose="vision")
    theirs = rig.sdk(KEY_B).files.create(file=("theirs.png", png_bytes(512, 512)), purpose="vision")
    bodies = [
        {"prompt": "the shoe in red", "size": "512x512", "images": [{"file_id": reference.id}]},
        {"prompt": "someone else's", "size": "512x512", "images": [{"file_id": theirs.id}]},
    ]
    uploaded = client.files.create(file=("edits.jsonl", lines_file(bodies, url="/v1/images/edits")), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/edits", completion_window="1h")
    done = rig.wait(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert [line["custom_id"] for line in rig.file_lines(done.output_file_id)] == ["req-0"]
    refused = rig.file_lines(done.error_file_id)[0]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["code"] == "file_not_found"  # another key's file does not exist for this one
    edited = rig.fakes["local"].calls[0]
    assert len(edited.references) == 1 and edited.references[0].data == png_bytes(512, 512)  # the upload's bytes reached the backend
