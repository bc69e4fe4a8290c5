"""Runflow adapter against respx mocks of the documented run protocol
(docs/providers/runflow.md)."""

from __future__ import annotations

import base64
import json
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx

from gateway.domain.job import JobKind, ReferenceImage
from gateway.providers.base import FailureClass, ProviderError, submitted_jobs
from gateway.providers.runflow import RunflowAdapter, RunflowOptions, extract_images

from .conftest import PNG_BYTES

BASE = "https://api.runflow.test"
KEY = "rf_live_secretkey123"
T2I = f"{BASE}/v1/models/black-forest-labs/flux-2-klein-4b/runs"
EDIT = f"{BASE}/v1/models/black-forest-labs/flux-2-klein-4b/edit/runs"
RUN = f"{BASE}/v1/runs/run_1"
CDN = "https://cdn.runflow-outputs.test/signed/out.png?sig=abc"


def run(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "run_1", "status_code": status, **extra}


def succeeded(**output: Any) -> dict[str, Any]:
    out = {"outputs": [{"url": CDN, "type": "image", "width": 1024, "height": 1024}], "seed": 42, "nsfw_detected": False}
    out.update(output)
    return run("succeeded", output=out, cost="0.005")


@pytest.fixture
def adapter(make_settings, http_client):
    def factory(**options: Any) -> RunflowAdapter:
        return RunflowAdapter(make_settings("runflow", BASE, KEY, **options), http_client)

    return factory


def sent_json(route: respx.Route, index: int = 0) -> dict[str, Any]:
    return json.loads(route.calls[index].request.content)


# ---- happy paths ---------------------------------------------------------------


async def test_text_to_image_follows_queued_dispatching_running_to_succeeded(mock, adapter, make_job, deadline):
    create = mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).mock(side_effect=[httpx.Response(200, json=run(s)) for s in ("dispatching", "running")] + [httpx.Response(200, json=succeeded())])
    job = make_job(width=1024, height=768, n=1, seed=7, steps=4, output_format="webp")

    result = await adapter().generate(job, deadline)

    body = sent_json(create)
    assert body["client_ref"] == job.request_id
    assert body["input"] == {
        "prompt": job.prompt,
        "image_size": {"width": 1024, "height": 768},
        "num_images": 1,
        "num_inference_steps": 4,
        "output_format": "webp",
        "enable_safety_checker": True,
        "seed": 7,
    }
    assert create.calls[0].request.headers["authorization"] == f"Bearer {KEY}"
    assert poll.call_count == 3
    assert all(c.request.headers["authorization"] == f"Bearer {KEY}" for c in poll.calls)
    assert result.job_id == "run_1"
    assert result.seed == 42
    assert result.reported_cost_usd == Decimal("0.005")
    [img] = result.images
    assert (img.url, img.width, img.height, img.content_type, img.nsfw) == (CDN, 1024, 1024, "image/png", False)


@pytest.mark.parametrize(
    ("url", "kind", "media"),
    [
        ("https://o/x.webp?sig=1", JobKind.GENERATE, "image/webp"),
        ("https://o/x?sig=1", JobKind.GENERATE, None),
        ("https://o/x?sig=1", JobKind.EDIT, "image/jpeg"),
    ],
)
async def test_output_media_type_is_claimed_only_when_known(mock, adapter, make_job, deadline, url, kind, media):
    mock.post(EDIT if kind is JobKind.EDIT else T2I).respond(201, json=succeeded(outputs=[{"url": url, "type": "image", "width": 1024, "height": 1024}]))
    result = await adapter().generate(make_job(kind=kind, output_format="png"), deadline)
    assert result.images[0].content_type == media


async def test_the_run_id_is_noted_for_dispatch_as_soon_as_it_exists(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    mock.get(RUN).respond(200, json=run("failed", failure_code="X", failure_message="boom"))
    noted: list[str] = []
    token = submitted_jobs.set(noted)
    try:
        with pytest.raises(ProviderError):
            await adapter().generate(make_job(), deadline)
    finally:
        submitted_jobs.reset(token)
    assert noted == ["run_1"]


async def test_create_answering_a_terminal_run_needs_no_poll(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(200, json=succeeded())
    poll = mock.get(RUN).respond(200, json=run("running"))
    result = await adapter().generate(make_job(), deadline)
    assert poll.call_count == 0
    assert result.images[0].url == CDN


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("object", (1024, 1024), {"width": 1024, "height": 1024}),
        ("preset", (1024, 1024), "square_hd"),
        ("preset", (1024, 576), "landscape_16_9"),
        ("preset", (1024, 512), {"width": 1024, "height": 512}),
        ("preset_only", (768, 1024), "portrait_4_3"),
    ],
)
async def test_image_size_is_sent_as_the_configured_mode(mock, adapter, make_job, deadline, mode, size, expected):
    create = mock.post(T2I).respond(201, json=succeeded())
    await adapter(image_size=mode).generate(make_job(width=size[0], height=size[1]), deadline)
    assert sent_json(create)["input"]["image_size"] == expected


def test_preset_only_makes_only_the_six_presets_eligible():
    caps = RunflowAdapter.capabilities_for({"image_size": "preset_only"})
    assert caps.exact_sizes == {(1024, 1024), (512, 512), (768, 1024), (576, 1024), (1024, 768), (1024, 576)}
    assert RunflowAdapter.capabilities_for({}).exact_sizes is None


@pytest.mark.parametrize(("send", "present"), [(False, False), (True, True)])
async def test_guidance_scale_is_sent_only_when_configured(mock, adapter, make_job, deadline, send, present):
    create = mock.post(T2I).respond(201, json=succeeded())
    await adapter(send_guidance_scale=send).generate(make_job(guidance_scale=2.0), deadline)
    assert ("guidance_scale" in sent_json(create)["input"]) is present


async def test_custom_model_path_is_used_and_encoded(mock, adapter, make_job, deadline):
    route = mock.post(f"{BASE}/v1/models/flux-2-klein-4b/runs").respond(201, json=succeeded())
    await adapter(model="flux-2-klein-4b").generate(make_job(), deadline)
    assert route.call_count == 1


# ---- edits -----------------------------------------------------------------------


async def test_edit_posts_documented_fields_to_the_edit_endpoint(mock, adapter, make_job, deadline):
    create = mock.post(EDIT).respond(201, json=run("queued"))
    mock.get(RUN).respond(200, json=succeeded(outputs=[{"url": "https://cdn.runflow-outputs.test/o", "type": "image", "width": 1024, "height": 1024}]))
    refs = (
        ReferenceImage(content_type="image/png", data=PNG_BYTES, url="https://example.test/a.png"),
        ReferenceImage(content_type="image/png", data=PNG_BYTES),
    )
    job = make_job(kind=JobKind.EDIT, references=refs, seed=3, steps=6)

    result = await adapter().generate(job, deadline)

    sent = sent_json(create)["input"]
    assert sent["prompt"] == job.prompt
    assert sent["image_urls"][0] == "https://example.test/a.png"  # the caller's URL wins over its bytes
    assert sent["image_urls"][1].startswith("data:image/png;base64,")
    assert (sent["steps"], sent["seed"]) == (6, 3)
    assert not {"image_size", "num_images", "num_inference_steps", "output_format"} & set(sent)
    assert result.images[0].content_type == "image/jpeg"  # RF-EDIT: output is JPEG


@pytest.mark.parametrize(
    ("field", "present"),
    [("steps", {"steps"}), ("num_inference_steps", {"num_inference_steps"}), ("both", {"steps", "num_inference_steps"})],
)
async def test_edit_steps_field_follows_the_option(mock, adapter, make_job, deadline, field, present):
    create = mock.post(EDIT).respond(201, json=succeeded())
    await adapter(edit_steps_field=field).generate(make_job(kind=JobKind.EDIT, steps=5), deadline)
    sent = sent_json(create)["input"]
    assert {k for k in ("steps", "num_inference_steps") if k in sent} == present
    assert all(sent[k] == 5 for k in present)


async def test_edit_size_and_count_are_sent_only_when_configured(mock, adapter, make_job, deadline):
    create = mock.post(EDIT).respond(201, json=succeeded())
    await adapter(edit_size_field="image_size", edit_num_images=True).generate(make_job(kind=JobKind.EDIT, width=768, height=512, n=2), deadline)
    sent = sent_json(create)["input"]
    assert sent["image_size"] == {"width": 768, "height": 512}
    assert sent["num_images"] == 2


def test_edit_capabilities_follow_the_documented_price_basis():
    edit = RunflowAdapter.capabilities_for({}, JobKind.EDIT)
    assert edit.exact_sizes == {(1024, 1024)}
    assert (edit.max_steps, edit.max_n, edit.output_formats) == (25, 1, {"jpeg"})
    sized = RunflowAdapter.capabilities_for({"edit_size_field": "image_size", "edit_num_images": True}, JobKind.EDIT)
    assert sized.exact_sizes is None
    assert (sized.max_pixels, sized.max_n) == (1024 * 1024, 4)
    t2i = RunflowAdapter.capabilities_for({})
    assert (t2i.max_steps, t2i.output_formats) == (50, {"png", "jpeg", "webp"})


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"width": 512, "height": 512}, "exactly 512x512"),
        ({"steps": 30}, "num_inference_steps"),
        ({"n": 2}, "images per request"),
    ],
)
async def test_edit_outside_the_edit_endpoint_limits_is_rejected_before_any_call(mock, adapter, make_job, deadline, overrides, reason):
    create = mock.post(EDIT).respond(201, json=succeeded())
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(kind=JobKind.EDIT, **overrides), deadline)
    assert info.value.failure is FailureClass.REJECTED
    assert reason in info.value.message
    assert create.call_count == 0


async def test_uploads_are_rejected_before_any_call_when_data_uris_are_off(mock, adapter, make_job, deadline):
    create = mock.post(EDIT).respond(201, json=succeeded())
    assert RunflowAdapter.capabilities_for({"data_uri_refs": False}).accepts_data_uri_refs is False
    with pytest.raises(ProviderError) as info:
        await adapter(data_uri_refs=False).generate(make_job(kind=JobKind.EDIT), deadline)
    assert info.value.failure is FailureClass.REJECTED
    assert create.call_count == 0


# ---- errors on create ---------------------------------------------------------------

FLAT = "flat"
NESTED = "nested"


def envelope(style: str, code: str, message: str, **extra: Any) -> dict[str, Any]:
    if style == FLAT:
        return {"code": code, "message": message, "errors": None, **extra}
    return {"error": {"code": code, "message": message}, **extra}


CREATE_ERRORS = [
    # status, code, failure, credentials_invalid, retry-after header
    (400, "BAD_REQUEST", FailureClass.REJECTED, False, None),
    (401, "UNAUTHORIZED", FailureClass.REFUSED, True, None),
    (402, "INSUFFICIENT_CREDIT", FailureClass.REFUSED, False, None),
    (403, "PERMISSION_DENIED", FailureClass.REFUSED, True, None),
    (404, "MODEL_NOT_FOUND", FailureClass.FAILED, False, None),
    (409, "CONFLICT", FailureClass.REJECTED, False, None),
    (422, "VALIDATION_FAILED", FailureClass.REJECTED, False, None),
    (429, "RATE_LIMITED", FailureClass.REFUSED, False, "7"),
    (503, "MODEL_UNAVAILABLE", FailureClass.REFUSED, False, "3"),
    (500, "INTERNAL", FailureClass.FAILED, False, None),
]


@pytest.mark.parametrize("style", [FLAT, NESTED])
@pytest.mark.parametrize(("status", "code", "failure", "creds", "retry_after"), CREATE_ERRORS)
async def test_create_errors_are_classified_from_either_envelope(mock, adapter, make_job, deadline, style, status, code, failure, creds, retry_after):
    headers = {"Retry-After": retry_after} if retry_after else {}
    mock.post(T2I).respond(status, json=envelope(style, code, f"{code.lower()} happened"), headers=headers)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    err = info.value
    assert (err.failure, err.status, err.code, err.credentials_invalid) == (failure, status, code, creds)
    assert err.retry_after == (float(retry_after) if retry_after else None)
    assert f"{code.lower()} happened" in err.message
    assert err.job_id is None and not err.billed
    assert KEY not in err.message


async def test_422_field_errors_are_named_in_the_message(mock, adapter, make_job, deadline):
    body = {"code": "VALIDATION_FAILED", "message": "invalid input", "errors": [{"field": "input.image_size", "message": "unsupported"}]}
    mock.post(T2I).respond(422, json=body)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert "input.image_size: unsupported" in info.value.message


@pytest.mark.parametrize(
    "response",
    [httpx.Response(201, text="<html>ok</html>"), httpx.Response(201, json={"status_code": "queued"}), httpx.Response(201, json=["run_1"])],
    ids=["garbage", "no-id", "not-an-object"],
)
async def test_create_without_a_readable_run_id_is_unknown_outcome(mock, adapter, make_job, deadline, response):
    mock.post(T2I).mock(return_value=response)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert info.value.failure is FailureClass.UNKNOWN_OUTCOME
    assert info.value.job_id is None and info.value.billed


async def test_create_error_with_an_html_body_uses_the_reason_phrase(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(502, text="<html>bad gateway</html>")
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert info.value.failure is FailureClass.FAILED
    assert "Bad Gateway" in info.value.message and "<html>" not in info.value.message


async def test_connect_error_on_create_is_unreachable(mock, adapter, make_job, deadline):
    mock.post(T2I).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert info.value.failure is FailureClass.UNREACHABLE and info.value.job_id is None


async def test_missing_key_is_refused_without_any_call(mock, make_settings, http_client, make_job, deadline):
    create = mock.post(T2I).respond(201, json=succeeded())
    with pytest.raises(ProviderError) as info:
        await RunflowAdapter(make_settings("runflow", BASE, None), http_client).generate(make_job(), deadline)
    assert info.value.failure is FailureClass.REFUSED and info.value.credentials_invalid
    assert create.call_count == 0


# ---- terminal states -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("terminal", "failure", "code"),
    [
        (run("failed", failure_code="INPUT_VALIDATION_FAILED", failure_message="image_urls[0] unreachable", failure_stage="dispatch"), FailureClass.REJECTED, "INPUT_VALIDATION_FAILED"),
        (run("failed", failure_code="PROVIDER_ERROR", failure_message="worker crashed"), FailureClass.FAILED, "PROVIDER_ERROR"),
        ({"id": "run_1", "status": "failed", "error": {"code": "INPUT_VALIDATION_FAILED", "message": "bad prompt"}}, FailureClass.REJECTED, "INPUT_VALIDATION_FAILED"),
        ({"id": "run_1", "status": "failed", "failure_message": "no code given"}, FailureClass.FAILED, None),
    ],
    ids=["validation", "provider-error", "sdk-error-object", "message-only"],
)
async def test_failed_runs_are_classified_and_not_billed(mock, adapter, make_job, deadline, terminal, failure, code):
    mock.post(T2I).respond(201, json=run("queued"))
    mock.get(RUN).respond(200, json=terminal)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    err = info.value
    assert (err.failure, err.code, err.job_id, err.billed) == (failure, code, "run_1", False)
    assert "run failed" in err.message and KEY not in err.message


@pytest.mark.parametrize("spelling", ["canceled", "cancelled"])
async def test_both_cancel_spellings_end_the_run(mock, adapter, make_job, deadline, spelling):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).mock(side_effect=[httpx.Response(200, json=run("running")), httpx.Response(200, json=run(spelling))])
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert info.value.failure is FailureClass.FAILED and info.value.job_id == "run_1"
    assert spelling in info.value.message
    assert poll.call_count == 2


async def test_partial_success_returns_the_images_that_came_back(mock, adapter, make_job, deadline):
    partial = run("partial_succeeded", output={"outputs": [{"url": CDN, "type": "image", "width": 1024, "height": 1024}], "seed": 9}, cost="0.01")
    mock.post(T2I).respond(201, json=partial)
    result = await adapter().generate(make_job(n=2), deadline)
    assert [img.url for img in result.images] == [CDN]
    assert result.reported_cost_usd == Decimal("0.01")


async def test_partial_success_without_images_is_failed(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("partial_succeeded", output={"outputs": []}, cost="0"))
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(n=2), deadline)
    assert info.value.failure is FailureClass.FAILED and not info.value.billed


# ---- polling -----------------------------------------------------------------------------


async def test_polling_rides_through_5xx_429_and_garbage(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).mock(
        side_effect=[
            httpx.Response(503, json={"code": "MODEL_UNAVAILABLE", "message": "down"}),
            httpx.Response(429, json={"code": "RATE_LIMITED", "message": "slow down"}, headers={"Retry-After": "0"}),
            httpx.Response(200, text="<html>"),
            httpx.Response(502, text="bad gateway"),
            httpx.Response(200, json=succeeded()),
        ]
    )
    result = await adapter().generate(make_job(), deadline)
    assert poll.call_count == 5
    assert result.images[0].url == CDN


async def test_a_brief_404_after_create_is_tolerated(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    mock.get(RUN).mock(side_effect=[httpx.Response(404, json={"code": "RUN_NOT_FOUND", "message": "no"}), httpx.Response(200, json=succeeded())])
    assert (await adapter().generate(make_job(), deadline)).job_id == "run_1"


async def test_a_run_that_stays_not_found_is_unknown_outcome(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).respond(404, json={"code": "RUN_NOT_FOUND", "message": "no such run"})
    with pytest.raises(ProviderError) as info:
        await adapter(poll_not_found_limit=2).generate(make_job(), deadline)
    err = info.value
    assert (err.failure, err.job_id, err.code, err.status) == (FailureClass.UNKNOWN_OUTCOME, "run_1", "RUN_NOT_FOUND", 404)
    assert poll.call_count == 2


async def test_credentials_rejected_while_polling_keep_the_run_id(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    mock.get(RUN).respond(401, json={"error": {"code": "UNAUTHORIZED", "message": "key revoked"}})
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    err = info.value
    assert (err.failure, err.job_id, err.credentials_invalid, err.billed) == (FailureClass.UNKNOWN_OUTCOME, "run_1", True, True)


async def test_timeout_after_the_run_exists_is_unknown_outcome_with_its_id(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert (info.value.failure, info.value.job_id, info.value.billed) == (FailureClass.UNKNOWN_OUTCOME, "run_1", True)
    assert poll.call_count == 3  # the first try and two retries


async def test_one_dropped_poll_is_retried(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).mock(side_effect=[httpx.RemoteProtocolError("dropped"), httpx.ReadTimeout("slow"), httpx.Response(200, json=succeeded())])
    assert (await adapter().generate(make_job(), deadline)).images[0].url == CDN
    assert poll.call_count == 3


async def test_deadline_while_queued_is_unknown_outcome_with_its_id(mock, adapter, make_job):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).respond(200, json=run("queued"))
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), started + 0.1)
    assert time.monotonic() - started < 1.0
    assert (info.value.failure, info.value.job_id) == (FailureClass.UNKNOWN_OUTCOME, "run_1")
    assert poll.call_count >= 1


async def test_unknown_status_keeps_polling(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    poll = mock.get(RUN).mock(side_effect=[httpx.Response(200, json=run("warming_up")), httpx.Response(200, json=succeeded())])
    await adapter().generate(make_job(), deadline)
    assert poll.call_count == 2


# ---- outputs and NSFW ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "urls"),
    [
        ({"outputs": [{"url": "https://o/1.png", "type": "image"}, {"url": "https://o/v.mp4", "type": "video"}]}, ["https://o/1.png"]),
        ({"image_urls": ["https://o/a.png", "https://o/b.png"]}, ["https://o/a.png", "https://o/b.png"]),
        ({"image": {"url": "https://o/i.png", "width": 512, "height": 512}}, ["https://o/i.png"]),
        ({"url": "https://o/u.png"}, ["https://o/u.png"]),
        ({"output_url": "https://o/ou.png"}, ["https://o/ou.png"]),
        ({"images": [{"url": "https://o/legacy.png", "content_type": "image/png"}], "has_nsfw_concepts": [False]}, ["https://o/legacy.png"]),
        ({"outputs": [{"url": "https://o/first.png"}], "url": "https://o/not-me.png"}, ["https://o/first.png"]),
        ({"outputs": []}, []),
        (None, []),
    ],
    ids=["outputs", "image_urls", "image", "url", "output_url", "legacy-images", "outputs-first", "empty", "none"],
)
def test_output_extractor_follows_the_sdk_order(output, urls):
    assert [img.url for img in extract_images(output, "image/png")] == urls


@pytest.mark.parametrize(
    ("flag", "expected"),
    [(False, [False, False]), (None, [None, None]), ([True, False], [True, False])],
)
async def test_nsfw_flags_are_reported_per_image(mock, adapter, make_job, deadline, flag, expected):
    outputs = [{"url": f"https://o/{i}.png", "type": "image", "width": 1024, "height": 1024} for i in range(2)]
    mock.post(T2I).respond(201, json=succeeded(outputs=outputs, nsfw_detected=flag))
    result = await adapter().generate(make_job(n=2), deadline)
    assert [img.nsfw for img in result.images] == expected


async def test_every_image_flagged_is_content_filtered(mock, adapter, make_job, deadline):
    mock.post(T2I).respond(201, json=run("queued"))
    mock.get(RUN).respond(200, json=succeeded(nsfw_detected=True))
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert (info.value.failure, info.value.job_id, info.value.billed) == (FailureClass.CONTENT_FILTERED, "run_1", True)


async def test_links_and_outputs_on_other_hosts_are_never_followed(mock, adapter, make_job, deadline):
    foreign = mock.route(host="evil.example.test")
    cdn = mock.route(host="cdn.runflow-outputs.test")
    created = run("queued", links={"self": "https://evil.example.test/v1/runs/run_1"})
    mock.post(T2I).respond(201, json=created)
    poll = mock.get(RUN).respond(200, json=succeeded())
    result = await adapter().generate(make_job(), deadline)
    assert poll.call_count == 1
    assert foreign.call_count == 0 and cdn.call_count == 0
    assert result.images[0].url == CDN


# ---- secrets ------------------------------------------------------------------------------------


def leaky(status: int) -> httpx.Response:
    return httpx.Response(status, json={"code": f"BAD_{KEY}", "message": f"key {KEY} rejected"})


LEAKY_CASES = [
    ("create-401", [leaky(401)], []),
    ("create-402", [leaky(402)], []),
    ("create-422", [leaky(422)], []),
    ("create-429", [leaky(429)], []),
    ("create-503", [leaky(503)], []),
    ("create-garbage", [httpx.Response(201, text=f"token={KEY}")], []),
    ("poll-403", [httpx.Response(201, json=run("queued"))], [leaky(403)]),
    ("poll-404", [httpx.Response(201, json=run("queued"))], [leaky(404)] * 3),
    ("failed", [httpx.Response(201, json=run("failed", failure_code="X", failure_message=f"bad {KEY}"))], []),
    ("cancelled", [httpx.Response(201, json=run("cancelled", error={"message": f"by {KEY}"}))], []),
]


@pytest.mark.parametrize(("create_responses", "poll_responses"), [c[1:] for c in LEAKY_CASES], ids=[c[0] for c in LEAKY_CASES])
async def test_no_error_message_carries_the_key(mock, adapter, make_job, deadline, create_responses, poll_responses):
    mock.post(T2I).mock(side_effect=create_responses)
    mock.get(RUN).mock(side_effect=poll_responses or [httpx.Response(500)])
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    err = info.value
    assert KEY not in err.message and KEY not in str(err) and KEY not in repr(err.args) and KEY not in (err.code or "")


# ---- probe and cancel --------------------------------------------------------------------------------


async def test_probe_hits_health_only_and_sends_no_key(mock, adapter):
    health = mock.get(f"{BASE}/v1/health").respond(200, json={"status": "ok"})
    generation = mock.route(method="POST")
    polls = mock.route(path__startswith="/v1/runs")
    result = await adapter().probe()
    assert result.ok and result.latency_s is not None
    assert health.call_count == 1 and generation.call_count == 0 and polls.call_count == 0
    assert "authorization" not in health.calls[0].request.headers


@pytest.mark.parametrize("failure", [httpx.Response(503), httpx.ConnectError("refused")], ids=["503", "connect"])
async def test_probe_reports_an_unhealthy_backend(mock, adapter, failure):
    route = mock.get(f"{BASE}/v1/health")
    if isinstance(failure, Exception):
        route.mock(side_effect=failure)
    else:
        route.mock(return_value=failure)
    result = await adapter().probe()
    assert not result.ok and result.detail


async def test_cancel_is_off_without_the_admin_option(mock, adapter):
    route = mock.post(f"{BASE}/v1/admin/runs/run_1/cancellation").respond(201, json={})
    assert await adapter().cancel("run_1") is None  # None: no cancel at this provider
    assert route.call_count == 0


@pytest.mark.parametrize(("status", "expected"), [(201, True), (200, False), (403, False), (404, False)])
async def test_admin_cancel_is_true_only_when_the_run_was_cancelled(mock, adapter, status, expected):
    route = mock.post(f"{BASE}/v1/admin/runs/run_1/cancellation").respond(status, json={})
    assert await adapter(admin_cancel=True).cancel("run_1") is expected
    assert route.call_count == 1
    sent = sent_json(route)
    assert 3 <= len(sent["reason"]) <= 500
    assert route.calls[0].request.headers["authorization"] == f"Bearer {KEY}"


# ---- options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"colour": "blue"}, "colour"),
        ({"model": "black-forest-labs/../x"}, "model"),
        ({"model": "a//b"}, "model"),
        ({"image_size": "huge"}, "image_size"),
        ({"edit_steps_field": "n_steps"}, "edit_steps_field"),
        ({"edit_size_field": "size"}, "edit_size_field"),
        ({"admin_cancel": "yes"}, "admin_cancel"),
        ({"edit_max_steps": 0}, "edit_max_steps"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, names):
    with pytest.raises(ValueError, match=names):
        RunflowOptions.parse(options)


def test_default_options_match_the_documents():
    opts = RunflowOptions.parse(None)
    assert opts.model == "black-forest-labs/flux-2-klein-4b"
    assert opts.edit_path == "black-forest-labs/flux-2-klein-4b/edit"
    assert (opts.image_size, opts.edit_steps_field, opts.data_uri_refs, opts.admin_cancel) == ("object", "steps", True, False)


def test_inline_data_uri_outputs_keep_their_base64():
    [img] = extract_images({"outputs": [{"url": "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode(), "type": "image"}]}, "image/png")
    assert (img.url, img.b64, img.data, img.content_type) == (None, base64.b64encode(PNG_BYTES).decode(), None, "image/png")


def test_malformed_data_uri_output_is_failed_and_billed():
    with pytest.raises(ProviderError) as info:
        extract_images({"outputs": [{"url": "data:image/png;base64,%%%", "type": "image"}]}, "image/png")
    assert info.value.failure is FailureClass.FAILED and info.value.billed
