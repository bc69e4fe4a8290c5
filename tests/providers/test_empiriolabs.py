"""EmpirioLabs adapter against respx mocks of its documented synchronous
endpoint (docs/providers/empiriolabs.md)."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
import respx

from gateway.domain.job import JobKind, ReferenceImage
from gateway.providers.base import FailureClass, ProviderError
from gateway.providers.empiriolabs import EmpirioLabsAdapter, EmpirioLabsOptions, extract_images

from .conftest import PNG_BYTES

BASE = "https://api.empiriolabs.test"
KEY = "sk-empiriolabs-secret987"
GEN = f"{BASE}/v1/images/generations"
SCHEMA = f"{BASE}/v1/models/flux-2-klein-4b"
CDN = "https://media.empiriolabs-cdn.test/signed/img.png?sig=1"
JPEG_BYTES = b"\xff\xd8\xff\xe0" + b"\x00" * 16
B64_PNG = base64.b64encode(PNG_BYTES).decode()


@pytest.fixture
def adapter(make_settings, http_client):
    def factory(**options: Any) -> EmpirioLabsAdapter:
        return EmpirioLabsAdapter(make_settings("empiriolabs", BASE, KEY, **options), http_client)

    return factory


def sent_json(route: respx.Route) -> dict[str, Any]:
    return json.loads(route.calls[0].request.content)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None, type_: str = "invalid_request_error") -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": type_, "code": code}}, headers=headers or {})


# ---- happy paths ---------------------------------------------------------------


async def test_url_response_returns_the_signed_url(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json={"created": 1735689600, "data": [{"url": CDN}]})
    job = make_job(width=1344, height=768, n=1, steps=4, seed=11, output_format="png")

    result = await adapter().generate(job, deadline)

    assert sent_json(route) == {
        "model": "flux-2-klein-4b",
        "prompt": job.prompt,
        "size": "1344x768",
        "num_inference_steps": 4,
        "seed": 11,
        "num_images": 1,
        "format": "png",
        "response_format": "url",
    }
    assert route.calls[0].request.headers["authorization"] == f"Bearer {KEY}"
    [img] = result.images
    assert (img.url, img.data, img.content_type, img.seed) == (CDN, None, "image/png", 11)
    assert (img.width, img.height) == (None, None)  # not reported; the gateway checks
    assert result.reported_cost_usd is None and result.job_id is None and result.seed == 11


async def test_b64_response_is_kept_as_sent_without_a_second_download(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json={"created": 1, "data": [{"b64_json": B64_PNG}, {"b64_json": base64.b64encode(JPEG_BYTES).decode()}]})
    job = make_job(n=2, response_format="b64_json", output_format="webp", guidance_scale=1.5)

    result = await adapter().generate(job, deadline)

    sent = sent_json(route)
    assert (sent["response_format"], sent["format"], sent["guidance_scale"], sent["num_images"]) == ("b64_json", "webp", 1.5, 2)
    assert [img.b64 for img in result.images] == [B64_PNG, base64.b64encode(JPEG_BYTES).decode()]  # as sent, never decoded whole
    assert all(img.data is None for img in result.images)
    assert [img.content_type for img in result.images] == ["image/png", "image/jpeg"]  # sniffed, not assumed
    assert all(img.url is None for img in result.images)


@pytest.mark.parametrize(
    ("option", "job_format", "wire"),
    [("auto", "url", "url"), ("auto", "b64_json", "b64_json"), ("url", "b64_json", "url"), ("b64_json", "url", "b64_json")],
)
async def test_response_format_follows_the_job_or_the_option(mock, adapter, make_job, deadline, option, job_format, wire):
    route = mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    await adapter(response_format=option).generate(make_job(response_format=job_format), deadline)
    assert sent_json(route)["response_format"] == wire


async def test_width_height_and_jpg_name_are_options(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    await adapter(size_field="width_height", jpeg_format="jpg").generate(make_job(width=768, height=1344, output_format="jpeg"), deadline)
    sent = sent_json(route)
    assert (sent["width"], sent["height"], sent["format"]) == (768, 1344, "jpg")
    assert "size" not in sent


async def test_url_extension_beats_the_requested_format(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json={"data": [{"url": "https://media.empiriolabs-cdn.test/a.webp?sig=2"}, {"url": "https://media.empiriolabs-cdn.test/b"}]})
    result = await adapter().generate(make_job(n=2, output_format="png"), deadline)
    assert [img.content_type for img in result.images] == ["image/webp", "image/png"]


async def test_assume_requested_size_reports_the_size_asked_for(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    result = await adapter(assume_requested_size=True).generate(make_job(width=1024, height=512), deadline)
    assert (result.images[0].width, result.images[0].height) == (1024, 512)


async def test_reference_urls_go_in_images(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    refs = (ReferenceImage(content_type="image/png", url="https://example.test/a.png"), ReferenceImage(content_type="image/png", data=PNG_BYTES, url="https://example.test/b.png"))
    await adapter().generate(make_job(kind=JobKind.EDIT, references=refs), deadline)
    assert sent_json(route)["images"] == ["https://example.test/a.png", "https://example.test/b.png"]


async def test_uploads_are_rejected_before_any_call_unless_data_uris_are_allowed(mock, adapter, make_job, deadline):
    route = mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    job = make_job(kind=JobKind.EDIT)  # one uploaded PNG
    with pytest.raises(ProviderError) as info:
        await adapter().generate(job, deadline)
    assert info.value.failure is FailureClass.REJECTED and route.call_count == 0

    await adapter(data_uri_refs=True).generate(job, deadline)
    assert sent_json(route)["images"][0].startswith("data:image/png;base64,")


def test_capabilities_follow_the_model_page():
    caps = EmpirioLabsAdapter.capabilities_for({})
    assert (caps.min_side, caps.max_side, caps.multiple_of, caps.max_pixels) == (256, 2048, 16, 1_048_576)
    assert (caps.min_steps, caps.max_steps, caps.max_n, caps.max_references) == (1, 12, 4, 4)
    assert caps.accepts_data_uri_refs is False
    assert caps.output_formats == {"png", "jpeg", "webp"}
    assert EmpirioLabsAdapter.capabilities_for({"data_uri_refs": True}, JobKind.EDIT).accepts_data_uri_refs is True


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"data": [{"url": "https://c/1.webp"}]}, [("https://c/1.webp", None)]),
        ({"images": ["https://c/2.png"]}, [("https://c/2.png", None)]),
        ({"images": [{"b64_json": B64_PNG}]}, [(None, B64_PNG)]),
        ({"images": [f"data:image/png;base64,{B64_PNG}"]}, [(None, B64_PNG)]),
        ({"data": [], "images": [{"url": "https://c/3.png"}]}, [("https://c/3.png", None)]),
        ({"data": [{"revised_prompt": "x"}]}, []),
        ({"created": 1}, []),
        (["https://c/4.png"], []),
    ],
    ids=["data-url", "images-strings", "images-b64", "images-data-uri", "empty-data-falls-back", "no-image-in-item", "no-list", "not-an-object"],
)
def test_extractor_reads_openai_data_and_images_defensively(body, expected):
    assert [(img.url, img.b64) for img in extract_images(body, "image/png")] == expected


async def test_seed_and_nsfw_reported_by_the_response_are_kept(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json={"seed": 77, "data": [{"url": CDN, "nsfw": True}, {"url": CDN, "nsfw": False}]})
    result = await adapter().generate(make_job(n=2), deadline)
    assert result.seed == 77 and [img.seed for img in result.images] == [77, 77]
    assert [img.nsfw for img in result.images] == [True, False]


async def test_every_image_flagged_is_content_filtered(mock, adapter, make_job, deadline):
    mock.post(GEN).respond(200, json={"data": [{"url": CDN, "nsfw": True}]})
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert info.value.failure is FailureClass.CONTENT_FILTERED and info.value.billed


async def test_output_urls_on_other_hosts_are_not_fetched(mock, adapter, make_job, deadline):
    cdn = mock.route(host="media.empiriolabs-cdn.test")
    mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    result = await adapter().generate(make_job(), deadline)
    assert result.images[0].url == CDN and cdn.call_count == 0


# ---- errors ------------------------------------------------------------------------

ERRORS = [
    # response, failure, credentials_invalid, retry_after, code
    (error(400, "invalid_request", "size too large"), FailureClass.REJECTED, False, None, "invalid_request"),
    (error(401, "missing_api_key", "no key", type_="authentication_error"), FailureClass.REFUSED, True, None, "missing_api_key"),
    (error(401, "invalid_api_key", "bad key", type_="authentication_error"), FailureClass.REFUSED, True, None, "invalid_api_key"),
    (error(402, "insufficient_credits", "top up"), FailureClass.REFUSED, False, None, "insufficient_credits"),
    (error(404, "model_not_found", "no such model"), FailureClass.FAILED, False, None, "model_not_found"),
    (error(422, "invalid_request", "steps out of range"), FailureClass.REJECTED, False, None, "invalid_request"),
    (error(429, "rate_limit_exceeded", "50 rpm", {"Retry-After": "12"}, "rate_limit_error"), FailureClass.REFUSED, False, 12.0, "rate_limit_exceeded"),
    (error(503, "model_unavailable", "warming", {"Retry-After": "5"}), FailureClass.REFUSED, False, 5.0, "model_unavailable"),
    (error(500, "upstream_error", "worker died", type_="server_error"), FailureClass.FAILED, False, None, "upstream_error"),
    (error(400, "upstream_error", "worker died"), FailureClass.FAILED, False, None, "upstream_error"),
    (httpx.Response(502, text="<html>bad gateway</html>"), FailureClass.FAILED, False, None, None),
    (httpx.Response(504, text="gateway timeout"), FailureClass.UNKNOWN_OUTCOME, False, None, None),
    (httpx.Response(401, json={"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}), FailureClass.REFUSED, True, None, "authentication_error"),
]


@pytest.mark.parametrize(("response", "failure", "creds", "retry_after", "code"), ERRORS, ids=lambda v: None)
async def test_errors_are_classified_by_status_and_documented_code(mock, adapter, make_job, deadline, response, failure, creds, retry_after, code):
    mock.post(GEN).mock(return_value=response)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    err = info.value
    assert (err.failure, err.status, err.credentials_invalid, err.retry_after, err.code) == (failure, response.status_code, creds, retry_after, code)
    assert err.job_id is None
    assert err.billed is (failure is FailureClass.UNKNOWN_OUTCOME)
    assert "<html>" not in err.message


@pytest.mark.parametrize(
    ("response", "billed"),
    [
        (httpx.Response(200, text="<html>not json</html>"), True),
        (httpx.Response(200, json={"created": 1, "data": []}), False),
        (httpx.Response(200, json={"data": [{"b64_json": "%%% not base64 %%%"}]}), True),
    ],
    ids=["garbage", "no-images", "broken-base64"],
)
async def test_unusable_success_bodies_are_failed(mock, adapter, make_job, deadline, response, billed):
    mock.post(GEN).mock(return_value=response)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(response_format="b64_json"), deadline)
    assert info.value.failure is FailureClass.FAILED and info.value.billed is billed


@pytest.mark.parametrize(
    ("exc", "failure", "billed"),
    [(httpx.ConnectError("refused"), FailureClass.UNREACHABLE, False), (httpx.ReadTimeout("slow"), FailureClass.UNKNOWN_OUTCOME, True)],
    ids=["connect", "read-timeout"],
)
async def test_transport_failures_are_classified(mock, adapter, make_job, deadline, exc, failure, billed):
    mock.post(GEN).mock(side_effect=exc)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    assert (info.value.failure, info.value.billed, info.value.job_id) == (failure, billed, None)


async def test_missing_key_is_refused_without_any_call(mock, make_settings, http_client, make_job, deadline):
    route = mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    with pytest.raises(ProviderError) as info:
        await EmpirioLabsAdapter(make_settings("empiriolabs", BASE, None), http_client).generate(make_job(), deadline)
    assert info.value.credentials_invalid and route.call_count == 0


LEAKS = [
    error(401, "invalid_api_key", f"Incorrect API key provided: {KEY}"),
    error(402, "insufficient_credits", f"account of {KEY} is empty"),
    error(429, f"rate_limit_exceeded_{KEY}", "slow down", {"Retry-After": "1"}),
    error(503, "model_unavailable", f"{KEY} cannot use this model now"),
    error(500, "upstream_error", f"upstream said {KEY}"),
    httpx.Response(400, json={"message": f"bad request for {KEY}"}),
    httpx.Response(200, text=f"Authorization: Bearer {KEY}"),
]


@pytest.mark.parametrize("response", LEAKS, ids=lambda r: str(r.status_code))
async def test_no_error_message_carries_the_key(mock, adapter, make_job, deadline, response):
    mock.post(GEN).mock(return_value=response)
    with pytest.raises(ProviderError) as info:
        await adapter().generate(make_job(), deadline)
    err = info.value
    assert KEY not in err.message and KEY not in str(err) and KEY not in (err.code or "")


# ---- probe, cancel, options ----------------------------------------------------------------


async def test_probe_reads_the_schema_endpoint_and_never_generates(mock, adapter):
    schema = mock.get(SCHEMA).respond(200, json={"id": "flux-2-klein-4b", "object": "model"})
    generation = mock.post(GEN).respond(200, json={"data": [{"url": CDN}]})
    result = await adapter().probe()
    assert result.ok and schema.call_count == 1 and generation.call_count == 0
    assert schema.calls[0].request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("response", "detail"),
    [(httpx.Response(401, json={"error": {"code": "invalid_api_key"}}), "credentials"), (httpx.Response(503), "503"), (httpx.ConnectError("x"), "connect")],
    ids=["401", "503", "connect"],
)
async def test_probe_reports_an_unhealthy_backend(mock, adapter, response, detail):
    route = mock.get(SCHEMA)
    if isinstance(response, Exception):
        route.mock(side_effect=response)
    else:
        route.mock(return_value=response)
    result = await adapter().probe()
    assert not result.ok and detail in result.detail
    assert KEY not in result.detail


async def test_there_is_nothing_to_cancel(mock, adapter):
    assert await adapter().cancel("anything") is None  # None: this provider has no cancel
    assert len(mock.calls) == 0


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"sizes": "x"}, "sizes"),
        ({"size_field": "dims"}, "size_field"),
        ({"response_format": "png"}, "response_format"),
        ({"jpeg_format": "jfif"}, "jpeg_format"),
        ({"data_uri_refs": 1}, "data_uri_refs"),
        ({"model": "a/b"}, "model"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        EmpirioLabsOptions.parse(options)
