"""Local backend adapter against respx mocks of the wire API in
local_backend/schemas.py: every status the service answers, and the probe."""

from __future__ import annotations

import base64
import json
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from gateway.domain.capabilities import eligible
from gateway.domain.job import JobKind, ReferenceImage
from gateway.providers import adapter_class
from gateway.providers.base import FailureClass, ProviderError
from gateway.providers.local import LocalAdapter, service_timeout

from .conftest import FAST_TIMEOUTS, PNG_BYTES

BASE = "http://127.0.0.1:8090"
GEN = f"{BASE}/v1/images/generations"
READY = f"{BASE}/health/ready"
INFO = f"{BASE}/v1/info"
WEBP_BYTES = b"RIFF\x00\x00\x00\x00WEBPVP8 "


@pytest.fixture
def adapter(make_settings, http_client) -> LocalAdapter:
    return LocalAdapter(make_settings("local", BASE + "/", None), http_client)


def sent_json(route: respx.Route) -> dict[str, Any]:
    return json.loads(route.calls[0].request.content)


def image(seed: int, nsfw: bool | None = None, data: bytes = PNG_BYTES, content_type: str = "image/png") -> dict[str, Any]:
    return {"b64_json": base64.b64encode(data).decode(), "width": 1024, "height": 1024, "seed": seed,
            "content_type": content_type, "nsfw": nsfw}  # fmt: skip


def generated(*images: dict[str, Any], cost: float | None = 0.0004) -> dict[str, Any]:
    return {"images": list(images), "seed": images[0]["seed"],
            "timings": {"queue_ms": 3.0, "inference_ms": 570.0, "batch_size": 2}, "cost_usd_estimate": cost}  # fmt: skip


def error(status: int, code: str, message: str = "no", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x", "code": code}}, headers=headers or {})


def test_registered_as_kind_local() -> None:
    assert adapter_class("local") is LocalAdapter


def test_importing_the_adapter_needs_no_torch() -> None:
    import subprocess

    code = "import sys, gateway.providers.local; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, check=False).returncode == 0


async def test_generate_sends_the_wire_request_and_returns_bytes_seeds_and_cost(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json=generated(image(11), image(12, nsfw=False)))
    job = make_job(n=2, steps=4, seed=11, output_format="png", enable_safety_checker=True, guidance_scale=2.5)

    result = await adapter.generate(job, deadline)

    body = sent_json(route)
    timeout = body.pop("timeout_s")
    assert body == {"prompt": job.prompt, "width": 1024, "height": 1024, "num_inference_steps": 4, "guidance_scale": 2.5,
                    "seed": 11, "num_images": 2, "output_format": "png", "enable_safety_checker": True,
                    "reference_images": []}  # fmt: skip
    assert timeout == pytest.approx(service_timeout(FAST_TIMEOUTS.request))  # the read timeout, less a margin
    # Images keep the service's base64 as it came: the gateway passes it through to b64_json callers.
    assert [(base64.b64decode(i.b64), i.seed, i.nsfw, i.content_type, i.width) for i in result.images] == [
        (PNG_BYTES, 11, None, "image/png", 1024),
        (PNG_BYTES, 12, False, "image/png", 1024),
    ]
    assert result.seed == 11
    assert result.reported_cost_usd == Decimal("0.0004")


async def test_references_travel_as_base64(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json=generated(image(1, data=WEBP_BYTES, content_type="image/webp")))
    refs = (ReferenceImage("image/png", data=PNG_BYTES), ReferenceImage("image/jpeg", data=b"\xff\xd8\xff\xe0"))
    result = await adapter.generate(make_job(kind=JobKind.EDIT, references=refs, output_format="webp"), deadline)
    assert sent_json(route)["reference_images"] == [base64.b64encode(r.data).decode() for r in refs]
    assert result.images[0].content_type == "image/webp" and base64.b64decode(result.images[0].b64) == WEBP_BYTES


async def test_a_reference_known_only_by_url_is_rejected_before_sending(mock, adapter, make_job, deadline):
    route = mock.post(GEN)
    job = make_job(kind=JobKind.EDIT, references=(ReferenceImage("image/png", url="https://example.test/a.png"),))
    with pytest.raises(ProviderError) as failure:
        await adapter.generate(job, deadline)
    assert failure.value.failure is FailureClass.REJECTED and not route.called


async def test_no_cost_figure_means_no_reported_cost(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json=generated(image(3), cost=None))
    assert (await adapter.generate(make_job(), deadline)).reported_cost_usd is None


@pytest.mark.parametrize(
    ("response", "failure", "retry_after", "billed"),
    [
        (error(429, "queue_full", "the queue is full", {"retry-after": "3"}), FailureClass.REFUSED, 3.0, False),
        (error(503, "not_ready", "warming up", {"retry-after": "5"}), FailureClass.REFUSED, 5.0, False),
        (error(503, "out_of_memory", "one 2048x2048 image does not fit"), FailureClass.REFUSED, None, False),
        (error(504, "deadline_exceeded", "the deadline passed"), FailureClass.FAILED, None, False),
        (error(422, "invalid_request", "width: must be a multiple of 16"), FailureClass.REJECTED, None, False),
        (error(400, "invalid_json", "the body is not valid JSON"), FailureClass.REJECTED, None, False),
        (error(413, "too_large", "body too large"), FailureClass.REJECTED, None, False),
        (error(500, "generation_failed", "the pipeline failed"), FailureClass.FAILED, None, False),
        # The service blames the reference image: the input's fault, whatever the status.
        (error(422, "invalid_reference_image", "reference_images[0] could not be decoded"), FailureClass.REJECTED, None, False),
        (error(500, "invalid_reference_image", "reference_images[0] could not be decoded"), FailureClass.REJECTED, None, False),
        (httpx.Response(502, text="<html>bad gateway</html>"), FailureClass.FAILED, None, False),
    ],
)
async def test_error_statuses_are_classified(mock, adapter, make_job, deadline, response, failure, retry_after, billed):
    mock.post(GEN).mock(return_value=response)
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(), deadline)
    err = raised.value
    assert (err.failure, err.status, err.retry_after, err.billed) == (failure, response.status_code, retry_after, billed)
    assert not err.credentials_invalid


async def test_the_service_error_message_and_code_are_kept(mock, adapter, make_job, deadline):
    mock.post(GEN).mock(return_value=error(422, "unsupported_request", "at most 1,048,576 pixels per image"))
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(), deadline)
    assert raised.value.code == "unsupported_request"
    assert "at most 1,048,576 pixels" in raised.value.message


async def test_connect_error_is_unreachable(mock, adapter, make_job, deadline):
    mock.post(GEN).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(), deadline)
    assert raised.value.failure is FailureClass.UNREACHABLE


async def test_read_timeout_is_an_unknown_outcome(mock, adapter, make_job, deadline):
    mock.post(GEN).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(), deadline)
    assert raised.value.failure is FailureClass.UNKNOWN_OUTCOME


async def test_past_deadline_sends_nothing(mock, adapter, make_job):
    route = mock.post(GEN)
    with pytest.raises(ProviderError):
        await adapter.generate(make_job(), time.monotonic() - 1)
    assert not route.called


@pytest.mark.parametrize(
    "body",
    [b"not json", json.dumps({"images": "nope"}).encode(), json.dumps(generated(image(1)) | {"images": []}).encode()],
)
async def test_a_broken_success_body_is_failed(mock, adapter, make_job, deadline, body):
    mock.post(GEN).respond(200, content=body)
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(), deadline)
    assert raised.value.failure is FailureClass.FAILED


async def test_every_image_flagged_is_content_filtered(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json=generated(image(1, nsfw=True), image(2, nsfw=True)))
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(n=2), deadline)
    assert raised.value.failure is FailureClass.CONTENT_FILTERED


async def test_some_images_flagged_are_returned_with_their_flags(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json=generated(image(1, nsfw=True), image(2, nsfw=False)))
    result = await adapter.generate(make_job(n=2), deadline)
    assert [i.nsfw for i in result.images] == [True, False]


async def test_a_job_the_wire_schema_refuses_is_rejected(mock, adapter, make_job, deadline):
    route = mock.post(GEN)
    with pytest.raises(ProviderError) as raised:
        await adapter.generate(make_job(prompt="x" * 4001), deadline)
    assert raised.value.failure is FailureClass.REJECTED and "prompt" in raised.value.message
    assert not route.called


@pytest.mark.parametrize(("remaining", "expected"), [(60.0, 59.0), (5.0, 4.5), (7200.0, 3600.0)])
def test_the_service_deadline_is_a_little_before_ours(remaining: float, expected: float) -> None:
    assert service_timeout(remaining) == pytest.approx(expected)


# ---- probe ---------------------------------------------------------------------------

INFO_BODY = {
    "model": "black-forest-labs/FLUX.2-klein-4B", "device": "cuda", "ready": True,
    "buckets": ["1024x1024", "512x512"], "max_batch_images": 8, "seconds_per_image": {"1024x1024": 0.57},
    "queue_depth": 3, "queue_capacity": 32, "estimated_wait_s": 1.71,
    "cost": {"marginal_usd_per_image": 0.000396, "amortized_usd_per_image": 0.00132, "gpu_usd_per_hour": 2.5,
             "basis": "1024x1024, 4 steps", "utilization": 0.3},
}  # fmt: skip


async def test_probe_reports_queue_wait_and_live_cost(mock, adapter):
    mock.get(READY).respond(200, json={"status": "ready"})
    info = mock.get(INFO).respond(200, json=INFO_BODY)
    result = await adapter.probe()
    assert result.ok and info.called and result.latency_s is not None
    # Cost figures are restated at 1 MP (the gpu_time sheet's unit) from the service's per-1024x1024 figures.
    assert result.live == {"estimated_wait_s": 1.71, "marginal_usd_per_image": pytest.approx(0.000396 / 1.048576),
                           "amortized_usd_per_image": pytest.approx(0.00132 / 1.048576), "queue_depth": 3, "queue_capacity": 32}  # fmt: skip


async def test_probe_without_a_price_reports_no_cost(mock, adapter):
    mock.get(READY).respond(200, json={"status": "ready"})
    mock.get(INFO).respond(200, json=INFO_BODY | {"cost": {"gpu_usd_per_hour": 0.0}})
    result = await adapter.probe()
    assert result.ok and result.live["marginal_usd_per_image"] is None


async def test_probe_while_warming_up_is_not_ok(mock, adapter):
    mock.get(READY).mock(return_value=error(503, "not_ready", "the model is still loading", {"retry-after": "5"}))
    info = mock.get(INFO)
    result = await adapter.probe()
    assert not result.ok and "still loading" in result.detail and not info.called


@pytest.mark.parametrize(
    ("info_response", "detail"),
    [(httpx.Response(500), "HTTP 500"), (httpx.Response(200, json={"model": "x"}), "not a BackendInfo")],
)
async def test_probe_with_a_bad_info_is_not_ok(mock, adapter, info_response, detail):
    mock.get(READY).respond(200, json={"status": "ready"})
    mock.get(INFO).mock(return_value=info_response)
    result = await adapter.probe()
    assert not result.ok and detail in result.detail


async def test_probe_of_a_stopped_service_is_unreachable(mock, adapter):
    mock.get(READY).mock(side_effect=httpx.ConnectError("refused"))
    result = await adapter.probe()
    assert not result.ok and "could not connect" in result.detail


@pytest.mark.parametrize(
    ("changes", "ok"),
    [
        ({}, True),
        ({"width": 2048, "height": 2048, "n": 4}, True),
        ({"width": 64, "height": 64, "steps": 50}, True),
        ({"width": 1000}, False),
        ({"width": 2064}, False),
        ({"steps": 51}, False),
        ({"n": 5}, False),
    ],
)
def test_capabilities_match_what_the_service_accepts(make_job, changes: dict, ok: bool) -> None:
    assert bool(eligible(make_job(**changes), LocalAdapter.default_capabilities)) is ok


def test_url_references_are_fetched_by_the_gateway_first() -> None:
    assert LocalAdapter.default_capabilities.accepts_url_refs is False
    assert LocalAdapter.default_capabilities.accepts_data_uri_refs is True


@pytest.mark.parametrize(
    ("figure", "reported"),
    [
        pytest.param("0.0004", Decimal("0.0004"), id="sane"),
        pytest.param("NaN", None, id="nan"),
        pytest.param("Infinity", None, id="infinity"),
        pytest.param("-0.01", None, id="negative"),
        pytest.param("1e9", None, id="absurd"),
    ],
)
async def test_a_cost_figure_that_is_not_a_sane_amount_falls_back_to_the_sheet(mock, adapter, make_job, deadline, figure, reported):
    """The images are made and paid for by then: a broken cost figure must not
    fail the request; the gateway then bills by the price sheet."""
    body = json.dumps(generated(image(3), cost=None)).replace('"cost_usd_estimate": null', f'"cost_usd_estimate": {figure}')
    mock.post(GEN).respond(200, content=body.encode(), headers={"content-type": "application/json"})
    result = await adapter.generate(make_job(), deadline)
    assert result.reported_cost_usd == reported
    assert len(result.images) == 1
