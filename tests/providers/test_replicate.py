"""Replicate adapter against Replicate's documented prediction protocol (docs/providers/replicate.md), mocked with respx."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
import respx

from gateway.domain.capabilities import eligible
from gateway.domain.job import JobKind, ReferenceImage
from gateway.providers.base import FailureClass, ProviderError
from gateway.providers.replicate import DEFAULT_SIZES, ReplicateAdapter, SizeSpec, size_table

from .conftest import PNG_BYTES

BASE = "https://api.replicate.test"
TOKEN = "r8_SeCrEtToKeN1234567890"
PID = "qx5abc"
CREATE = f"{BASE}/v1/models/black-forest-labs/flux-2-klein-4b/predictions"
GET = f"{BASE}/v1/predictions/{PID}"
MODEL = f"{BASE}/v1/models/black-forest-labs/flux-2-klein-4b"
OUT = "https://replicate.delivery/xezq/abc/out-0.webp"


def prediction(status: str = "succeeded", pid: str = PID, **extra: object) -> dict:
    body = {
        "id": pid,
        "model": "black-forest-labs/flux-2-klein-4b",
        "version": "hidden",
        "input": {},
        "status": status,
        "output": [OUT] if status == "succeeded" else None,
        "error": None,
        "logs": "",
        "metrics": {"predict_time": 0.8} if status == "succeeded" else {},
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:01Z" if status != "starting" else None,
        "urls": {"get": f"{BASE}/v1/predictions/{pid}", "cancel": f"{BASE}/v1/predictions/{pid}/cancel", "web": f"https://replicate.com/p/{pid}"},
    }
    body.update(extra)
    return body


def assert_no_token(err: ProviderError) -> None:
    for text in (err.message, str(err), repr(err)):
        assert TOKEN not in text


@pytest.fixture
def replicate(make_settings, http_client) -> ReplicateAdapter:
    return ReplicateAdapter(make_settings("replicate", BASE, TOKEN), http_client)


@pytest.fixture
def mock():
    with respx.mock(assert_all_called=False) as router:
        yield router


def sent_input(route: respx.Route) -> dict:
    return json.loads(route.calls.last.request.content)["input"]


# ---- happy paths ---------------------------------------------------------------


async def test_sync_create_with_prefer_wait_returns_the_output(replicate, mock, make_job):
    create = mock.post(CREATE).respond(201, json=prediction("succeeded"))
    poll = mock.get(GET).respond(200, json=prediction("succeeded"))

    result = await replicate.generate(make_job(seed=7, output_format="jpeg"), time.monotonic() + 120)

    request = create.calls.last.request
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["prefer"] == "wait=60"
    assert request.headers["cancel-after"] in ("119s", "120s")
    assert sent_input(create) == {
        "prompt": "a red fox in the snow",
        "aspect_ratio": "1:1",
        "output_megapixels": "1",
        "output_format": "jpg",
        "seed": 7,
        "disable_safety_checker": False,
    }
    assert not poll.called
    [image] = result.images
    # Replicate reports no size: verify_size "header" (the default) leaves it for the gateway to read
    assert (image.url, image.content_type, image.width, image.height) == (OUT, "image/webp", None, None)
    assert result.job_id == PID and result.seed == 7
    assert result.raw["predict_time"] == pytest.approx(0.8) and result.reported_cost_usd is None


async def test_prefer_wait_ends_a_margin_before_the_deadline(replicate, mock, make_job):
    """The hold ends prefer_wait_margin_s (1 s) before the deadline, so the
    create answers with the prediction's id while the attempt can still use it."""
    create = mock.post(CREATE).respond(201, json=prediction())
    await replicate.generate(make_job(), time.monotonic() + 3.5)
    assert create.calls.last.request.headers["prefer"] == "wait=2"  # floor(3.5 - 1)
    assert create.calls.last.request.headers["cancel-after"] == "4s"


@pytest.mark.parametrize(
    ("remaining", "margin", "prefer"),
    [
        (120.0, 1.0, "wait=60"),  # Replicate's cap
        (3.5, 1.0, "wait=2"),
        (2.0, 1.0, None),  # floor(~0.99) < 1: no hold at all, an async create
        (1.5, 1.0, None),
        (0.5, 1.0, None),  # the old rule sent wait=1 here, outliving the deadline
        (3.5, 0.0, "wait=3"),
        (12.0, 2.5, "wait=9"),
    ],
)
async def test_the_hold_always_ends_before_the_deadline(make_settings, http_client, mock, make_job, remaining, margin, prefer):
    adapter = ReplicateAdapter(make_settings("replicate", BASE, TOKEN, prefer_wait_margin_s=margin), http_client)
    create = mock.post(CREATE).respond(201, json=prediction())
    await adapter.generate(make_job(), time.monotonic() + remaining)
    assert create.calls.last.request.headers.get("prefer") == prefer


async def test_a_deadline_shorter_than_the_prediction_still_learns_its_id(replicate, mock, make_job):
    """A 2 s deadline and a prediction that takes 10 s: the create returns at
    once (no hold), its id is noted for dispatch, and the deadline ends the
    attempt as an unknown outcome carrying that id, so it can be cancelled."""
    from gateway.providers.base import submitted_jobs

    create = mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(GET).respond(200, json=prediction("processing"))
    submitted: list[str] = []
    token = submitted_jobs.set(submitted)
    try:
        with pytest.raises(ProviderError) as info:
            await replicate.generate(make_job(), time.monotonic() + 2.0)
    finally:
        submitted_jobs.reset(token)
    assert "prefer" not in create.calls.last.request.headers
    assert submitted == [PID]
    assert info.value.failure is FailureClass.UNKNOWN_OUTCOME and info.value.job_id == PID


def test_a_negative_prefer_wait_margin_is_refused(make_settings, http_client):
    with pytest.raises(ValueError, match="prefer_wait_margin_s"):
        ReplicateAdapter(make_settings("replicate", BASE, TOKEN, prefer_wait_margin_s=-1), http_client)


async def test_starting_prediction_is_polled_until_it_succeeds(replicate, mock, make_job, deadline):
    mock.post(CREATE).respond(201, json=prediction("starting"))
    poll = mock.get(GET).mock(side_effect=[httpx.Response(200, json=prediction("processing")), httpx.Response(200, json=prediction("succeeded"))])

    result = await replicate.generate(make_job(), deadline)

    assert poll.call_count == 2
    assert all(call.request.headers["authorization"] == f"Bearer {TOKEN}" for call in poll.calls)
    assert result.images[0].url == OUT


async def test_edit_sends_references_in_images_with_the_size_tables_ratio(replicate, mock, make_job, deadline):
    create = mock.post(CREATE).respond(201, json=prediction())
    refs = (
        ReferenceImage(content_type="image/png", data=PNG_BYTES, width=64, height=64),
        ReferenceImage(content_type="image/jpeg", url="https://example.com/cat.jpg"),
    )

    await replicate.generate(make_job(kind=JobKind.EDIT, references=refs, width=1365, height=768), deadline)

    body = sent_input(create)
    assert body["images"] == ["data:image/png;base64," + base64.b64encode(PNG_BYTES).decode(), "https://example.com/cat.jpg"]
    assert (body["aspect_ratio"], body["output_megapixels"]) == ("16:9", "1")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ([OUT], OUT),
        (OUT, OUT),  # flux-2-dev/pro style: a single URI string
    ],
)
async def test_output_is_an_array_or_a_single_uri(replicate, mock, make_job, deadline, output, expected):
    mock.post(CREATE).respond(201, json=prediction(output=output))
    assert [img.url for img in (await replicate.generate(make_job(), deadline)).images] == [expected]


async def test_data_uri_output_keeps_its_base64(replicate, mock, make_job, deadline):
    mock.post(CREATE).respond(201, json=prediction(output=["data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()]))
    [image] = (await replicate.generate(make_job(), deadline)).images
    assert (image.b64, image.data, image.content_type) == (base64.b64encode(PNG_BYTES).decode(), None, "image/png")


async def test_options_turn_off_prefer_wait_and_cancel_after_and_set_go_fast(make_settings, http_client, mock, make_job, deadline):
    adapter = ReplicateAdapter(make_settings("replicate", BASE, TOKEN, prefer_wait_s=0, cancel_after=None, go_fast=True), http_client)
    create = mock.post(CREATE).respond(201, json=prediction())
    await adapter.generate(make_job(output_format="webp", output_compression=70), deadline)
    headers = create.calls.last.request.headers
    assert "prefer" not in headers and "cancel-after" not in headers
    body = sent_input(create)
    assert body["go_fast"] is True and body["output_quality"] == 70 and body["output_format"] == "webp"


async def test_n_images_are_separate_predictions_with_consecutive_seeds(replicate, mock, make_job, deadline):
    def reply(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["input"]["seed"]
        return httpx.Response(201, json=prediction(pid=f"p{seed}", output=[f"https://replicate.delivery/{seed}.png"]))

    create = mock.post(CREATE).mock(side_effect=reply)
    result = await replicate.generate(make_job(n=3, seed=10), deadline)

    assert create.call_count == 3
    assert [(img.url, img.seed) for img in result.images] == [(f"https://replicate.delivery/{s}.png", s) for s in (10, 11, 12)]
    assert sorted(result.job_id.split(",")) == ["p10", "p11", "p12"]
    assert result.raw["predict_time"] == pytest.approx(2.4)


async def test_one_failed_prediction_of_several_stops_the_others(replicate, mock, make_job, deadline):
    def reply(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["input"]["seed"]
        if seed == 1:
            return httpx.Response(422, json={"status": 422, "detail": "bad input"})
        return httpx.Response(201, json=prediction("processing", pid="slow"))

    mock.post(CREATE).mock(side_effect=reply)
    mock.get(f"{BASE}/v1/predictions/slow").respond(200, json=prediction("processing", pid="slow"))
    cancel = mock.post(f"{BASE}/v1/predictions/slow/cancel").respond(200, json=prediction("canceled", pid="slow"))

    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(n=2, seed=0), deadline)

    assert caught.value.failure is FailureClass.REJECTED
    assert caught.value.billed  # the sibling was running and is billed when canceled
    assert cancel.called


# ---- terminal statuses ----------------------------------------------------------

TERMINAL_FAILURES = [
    # (prediction overrides, failure, billed, code)
    pytest.param({"status": "failed", "error": "CUDA out of memory"}, FailureClass.FAILED, True, "failed", id="failed-after-start"),
    pytest.param({"status": "failed", "error": "Invalid image", "started_at": None}, FailureClass.FAILED, False, "failed", id="failed-before-start"),
    pytest.param({"status": "failed", "error": "NSFW content detected. Try a different prompt."}, FailureClass.CONTENT_FILTERED, True, "failed", id="failed-nsfw"),
    pytest.param({"status": "failed", "error": f"token {TOKEN} rejected by upstream"}, FailureClass.FAILED, True, "failed", id="failed-echoing-token"),
    pytest.param({"status": "canceled"}, FailureClass.FAILED, True, "canceled", id="canceled"),
    pytest.param({"status": "aborted", "started_at": None}, FailureClass.FAILED, False, "aborted", id="aborted"),
    pytest.param({"status": "exploded"}, FailureClass.FAILED, True, None, id="unknown-status"),
]


@pytest.mark.parametrize(("overrides", "failure", "billed", "code"), TERMINAL_FAILURES)
@pytest.mark.parametrize("via", ["create", "poll"])
async def test_terminal_failures_are_classified(replicate, mock, make_job, deadline, overrides, failure, billed, code, via):
    final = prediction(**{"output": None, **overrides})
    if via == "create":
        mock.post(CREATE).respond(201, json=final)
    else:
        mock.post(CREATE).respond(201, json=prediction("starting"))
        mock.get(GET).respond(200, json=final)

    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(), deadline)

    err = caught.value
    assert (err.failure, err.billed, err.job_id, err.code) == (failure, billed, PID, code)
    assert_no_token(err)


def test_failed_error_text_is_in_the_message(replicate):
    with pytest.raises(ProviderError) as caught:
        replicate._settle(prediction("failed", error="CUDA out of memory"), PID)
    assert "CUDA out of memory" in caught.value.message


# ---- HTTP errors ----------------------------------------------------------------

CREATE_ERRORS = [
    # (reply, failure, status, retry_after, credentials_invalid)
    pytest.param(
        httpx.Response(
            422,
            json={
                "title": "Input validation failed",
                "status": 422,
                "detail": "- input.seed: Invalid type. Expected: integer",
                "invalid_fields": [{"type": "invalid_type", "field": "input.seed", "description": "Expected integer"}],
            },
        ),
        FailureClass.REJECTED,
        422,
        None,
        False,
        id="422-problem-details",
    ),
    pytest.param(
        httpx.Response(429, json={"detail": "Request was throttled. Your rate limit resets in ~30s.", "status": 429}, headers={"Retry-After": "12"}),
        FailureClass.REFUSED,
        429,
        12.0,
        False,
        id="429-retry-after",
    ),
    pytest.param(
        httpx.Response(429, json={"detail": "Request was throttled. Your rate limit resets in ~30s.", "status": 429}),
        FailureClass.REFUSED,
        429,
        30.0,
        False,
        id="429-reset-from-detail",
    ),
    pytest.param(
        httpx.Response(401, json={"title": "Unauthenticated", "detail": f"You did not pass a valid authentication token ({TOKEN})", "status": 401}),
        FailureClass.REFUSED,
        401,
        None,
        True,
        id="401-echoing-token",
    ),
    pytest.param(httpx.Response(402, json={"title": "Insufficient credit", "detail": "Add a payment method", "status": 402}), FailureClass.REFUSED, 402, None, False, id="402"),
    pytest.param(httpx.Response(404, json={"title": "Not found", "detail": "The requested resource could not be found.", "status": 404}), FailureClass.FAILED, 404, None, False, id="404-model"),
    pytest.param(httpx.Response(500, text="Internal Server Error"), FailureClass.FAILED, 500, None, False, id="500"),
    pytest.param(httpx.Response(503, json={"detail": "Service unavailable", "status": 503}, headers={"Retry-After": "5"}), FailureClass.REFUSED, 503, 5.0, False, id="503"),
    pytest.param(httpx.Response(201, text="<html>not json"), FailureClass.FAILED, 201, None, False, id="garbage-body"),
    pytest.param(httpx.Response(201, json={"status": "starting"}), FailureClass.FAILED, 201, None, False, id="no-id"),
    pytest.param(httpx.ConnectError("refused"), FailureClass.UNREACHABLE, None, None, False, id="connect-error"),
    pytest.param(httpx.ReadTimeout("no answer"), FailureClass.UNKNOWN_OUTCOME, None, None, False, id="timeout-before-id"),
]


@pytest.mark.parametrize(("reply", "failure", "status_code", "retry_after", "creds"), CREATE_ERRORS)
async def test_create_errors_are_classified(replicate, mock, make_job, deadline, reply, failure, status_code, retry_after, creds):
    create = mock.post(CREATE).mock(side_effect=[reply])
    poll = mock.get(GET).respond(200, json=prediction())

    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(), deadline)

    err = caught.value
    assert (err.failure, err.status, err.credentials_invalid, err.job_id) == (failure, status_code, creds, None)
    assert err.retry_after == (pytest.approx(retry_after) if retry_after is not None else None)
    assert create.call_count == 1 and not poll.called
    assert_no_token(err)


async def test_problem_details_message_names_the_invalid_fields(replicate, mock, make_job, deadline):
    mock.post(CREATE).respond(
        422, json={"title": "Input validation failed", "status": 422, "invalid_fields": [{"type": "enum", "field": "input.aspect_ratio", "description": "must be one of 1:1, 16:9"}]}
    )
    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(), deadline)
    assert "input.aspect_ratio: must be one of 1:1, 16:9" in caught.value.message


@pytest.mark.parametrize(
    ("poll_reply", "creds"),
    [
        pytest.param(httpx.ReadTimeout("slow"), False, id="timeout-after-id"),
        pytest.param(httpx.ConnectError("reset"), False, id="connection-lost-after-id"),
        pytest.param(httpx.Response(500), False, id="poll-keeps-failing"),
        pytest.param(httpx.Response(200, text="garbage"), False, id="garbage-poll-body"),
        pytest.param(httpx.Response(401, json={"detail": "Invalid token", "status": 401}), True, id="401-while-following"),
    ],
)
async def test_poll_failures_after_create_are_unknown_outcomes_with_the_id(replicate, mock, make_job, deadline, poll_reply, creds):
    mock.post(CREATE).respond(201, json=prediction("starting"))
    poll = mock.get(GET).mock(side_effect=poll_reply) if isinstance(poll_reply, Exception) else mock.get(GET).mock(return_value=poll_reply)

    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(), deadline)

    err = caught.value
    assert (err.failure, err.job_id, err.billed, err.credentials_invalid) == (FailureClass.UNKNOWN_OUTCOME, PID, True, creds)
    assert poll.call_count <= 6
    assert_no_token(err)


async def test_transient_poll_errors_are_waited_out(replicate, mock, make_job, deadline):
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(GET).mock(side_effect=[httpx.Response(429, headers={"Retry-After": "0"}), httpx.ReadTimeout("slow"), httpx.Response(200, json=prediction())])
    assert (await replicate.generate(make_job(), deadline)).job_id == PID


async def test_deadline_while_processing_is_an_unknown_outcome_with_the_id(replicate, mock, make_job):
    mock.post(CREATE).respond(201, json=prediction("starting"))
    mock.get(GET).respond(200, json=prediction("processing"))
    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(), time.monotonic() + 0.05)
    assert (caught.value.failure, caught.value.job_id) == (FailureClass.UNKNOWN_OUTCOME, PID)


@pytest.mark.parametrize(
    "foreign",
    [
        "https://evil.test/v1/predictions/qx5abc",
        "http://api.replicate.test/v1/predictions/qx5abc",
        "https://api.replicate.test:8443/v1/predictions/qx5abc",
        "https://api.replicate.test@evil.test/v1/predictions/qx5abc",
    ],
)
async def test_foreign_urls_get_is_not_followed_with_the_token(replicate, mock, make_job, deadline, foreign):
    mock.post(CREATE).respond(201, json=prediction("starting", urls={"get": foreign, "cancel": foreign + "/cancel"}))
    own = mock.get(GET).respond(200, json=prediction())
    elsewhere = mock.route(url__regex=r"^(?!https://api\.replicate\.test/).*").respond(200, json=prediction())

    await replicate.generate(make_job(), deadline)

    assert own.called and not elsewhere.called
    sent_to = {(c.request.url.scheme, c.request.url.host, c.request.url.port) for c in mock.calls}
    assert sent_to == {("https", "api.replicate.test", None)}


async def test_size_outside_the_table_is_rejected_without_a_request(replicate, mock, make_job, deadline):
    create = mock.post(CREATE).respond(201, json=prediction())
    with pytest.raises(ProviderError) as caught:
        await replicate.generate(make_job(width=1024, height=768), deadline)
    assert caught.value.failure is FailureClass.REJECTED and not create.called


async def test_missing_token_is_refused_without_a_request(make_settings, http_client, mock, make_job, deadline):
    adapter = ReplicateAdapter(make_settings("replicate", BASE, None), http_client)
    create = mock.post(CREATE).respond(201, json=prediction())
    with pytest.raises(ProviderError) as caught:
        await adapter.generate(make_job(), deadline)
    assert caught.value.credentials_invalid and not create.called


# ---- cancel and probe -----------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "accepted"),
    [
        ([httpx.Response(200, json=prediction("canceled"))], True),
        ([httpx.Response(404, json={"detail": "Not found", "status": 404})], False),
        ([httpx.ConnectError("down")], False),
    ],
)
async def test_cancel_posts_to_the_cancel_endpoint(replicate, mock, replies, accepted):
    route = mock.post(f"{GET}/cancel").mock(side_effect=replies)
    assert await replicate.cancel(PID) is accepted
    assert route.call_count == 1 and route.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"


async def test_cancel_of_a_fanned_out_job_cancels_every_prediction(replicate, mock):
    routes = [mock.post(f"{BASE}/v1/predictions/{pid}/cancel").respond(200, json=prediction("canceled", pid=pid)) for pid in ("a", "b")]
    assert await replicate.cancel("a,b") is True
    assert all(route.call_count == 1 for route in routes)


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        (httpx.Response(200, json={"owner": "black-forest-labs", "name": "flux-2-klein-4b"}), True),
        (httpx.Response(401, json={"detail": "Unauthenticated", "status": 401}), False),
        (httpx.Response(404, json={"detail": "Not found", "status": 404}), False),
        (httpx.Response(500), False),
        (httpx.ConnectError("down"), False),
    ],
)
async def test_probe_reads_model_metadata_and_never_creates(replicate, mock, reply, ok):
    creates = mock.post(url__startswith=BASE).respond(201, json=prediction())
    metadata = mock.get(MODEL).mock(side_effect=[reply])
    result = await replicate.probe()
    assert result.ok is ok and metadata.call_count == 1
    assert creates.call_count == 0
    assert TOKEN not in result.detail


# ---- the size table ---------------------------------------------------------------


def test_default_capabilities_are_exactly_the_published_sizes():
    caps = ReplicateAdapter.capabilities_for({})
    assert caps.exact_sizes == frozenset(DEFAULT_SIZES) == ReplicateAdapter.default_capabilities.exact_sizes
    assert len(caps.exact_sizes) == 11 and caps.fixed_steps == 4


@pytest.mark.parametrize(("width", "height", "ok"), [(1024, 1024, True), (1365, 768, True), (670, 1564, True), (1024, 768, False), (512, 512, False)])
def test_eligibility_follows_the_size_table(make_job, width, height, ok):
    assert bool(eligible(make_job(width=width, height=height), ReplicateAdapter.capabilities_for({}))) is ok


async def test_sizes_option_overrides_the_table_and_the_capabilities(make_settings, http_client, mock, make_job, deadline):
    options = {"sizes": {"512x512": {"aspect_ratio": "1:1", "output_megapixels": 0.25}, "2048x2048": ["1:1", 4]}}
    caps = ReplicateAdapter.capabilities_for(options)
    assert caps.exact_sizes == frozenset({(512, 512), (2048, 2048)})
    adapter = ReplicateAdapter(make_settings("replicate", BASE, TOKEN, **options), http_client)
    create = mock.post(CREATE).respond(201, json=prediction())

    await adapter.generate(make_job(width=512, height=512), deadline)

    assert (sent_input(create)["aspect_ratio"], sent_input(create)["output_megapixels"]) == ("1:1", "0.25")
    assert not eligible(make_job(), caps)


@pytest.mark.parametrize(
    "sizes",
    [
        {},
        ["1024x1024"],
        {"big": {"aspect_ratio": "1:1"}},
        {"1024x1024": {"output_megapixels": "1"}},
        {"1024x1024": ["1:1"]},
        {"1024x1024": {"aspect_ratio": "1:1", "output_megapixels": None}},
    ],
)
def test_bad_sizes_option_is_refused_naming_the_entry(sizes):
    with pytest.raises(ValueError, match=r"options\.sizes"):
        size_table({"sizes": sizes})


def test_size_table_accepts_numbers_as_megapixel_strings():
    assert size_table({"sizes": {"1024x1024": {"aspect_ratio": "1:1", "output_megapixels": 1}}}) == {(1024, 1024): SizeSpec("1:1", "1")}
