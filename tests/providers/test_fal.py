"""fal adapter against fal's documented queue protocol (docs/providers/fal.md), mocked with respx."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
import respx

from gateway.domain.job import JobKind, ReferenceImage
from gateway.providers.base import FailureClass, ProviderError
from gateway.providers.fal import FalAdapter, error_detail, queue_app

from .conftest import PNG_BYTES

BASE = "https://queue.fal.test"
KEY = "key-id-1234:key-secret-abcdef"
RID = "80e7-req"
SUBMIT = f"{BASE}/fal-ai/flux-2/klein/4b"
SUBMIT_EDIT = f"{BASE}/fal-ai/flux-2/klein/4b/edit"
RESULT = f"{BASE}/fal-ai/flux-2/requests/{RID}"
STATUS = f"{RESULT}/status"
CANCEL = f"{RESULT}/cancel"


def submitted(**overrides: object) -> dict:
    body = {"request_id": RID, "response_url": RESULT, "status_url": STATUS, "cancel_url": CANCEL, "status": "IN_QUEUE", "queue_position": 0}
    body.update(overrides)
    return body


def status(value: str, **extra: object) -> httpx.Response:
    return httpx.Response(200, json={"status": value, "request_id": RID, "response_url": RESULT, "status_url": STATUS, "cancel_url": CANCEL, **extra})


def output(n: int = 1, nsfw: list[bool] | None = None, url: str = "https://v3.fal.media/files/out.png") -> dict:
    return {
        "images": [{"url": url, "content_type": "image/png", "file_name": "out.png", "file_size": 123, "width": 1024, "height": 1024}] * n,
        "seed": 42,
        "has_nsfw_concepts": nsfw if nsfw is not None else [False] * n,
        "prompt": "a red fox in the snow",
        "timings": {"inference": 0.3},
    }


def assert_no_key(err: ProviderError) -> None:
    for text in (err.message, str(err), repr(err)):
        assert KEY not in text
        for part in KEY.split(":"):
            assert part not in text


@pytest.fixture
def fal(make_settings, http_client) -> FalAdapter:
    return FalAdapter(make_settings("fal", BASE, KEY), http_client)


@pytest.fixture
def mock():
    with respx.mock(assert_all_called=False) as router:
        yield router


def happy_queue(mock, result: dict | None = None) -> dict[str, respx.Route]:
    return {
        "submit": mock.post(SUBMIT).respond(200, json=submitted()),
        "status": mock.get(STATUS).mock(side_effect=[status("IN_QUEUE", queue_position=0), status("IN_PROGRESS", logs=[]), status("COMPLETED", metrics={"inference_time": 0.3})]),
        "result": mock.get(RESULT).respond(200, json=result or output()),
    }


# ---- happy paths ---------------------------------------------------------------


async def test_text_to_image_goes_through_the_queue_and_returns_the_images(fal, mock, make_job, deadline):
    routes = happy_queue(mock)
    result = await fal.generate(make_job(seed=7, output_format="png", steps=4), deadline)

    assert routes["status"].call_count == 3 and routes["result"].call_count == 1
    assert result.job_id == RID and result.seed == 42
    [image] = result.images
    assert (image.url, image.content_type, image.width, image.height, image.nsfw) == ("https://v3.fal.media/files/out.png", "image/png", 1024, 1024, False)
    assert result.raw["metrics"] == {"inference_time": 0.3}


async def test_submit_sends_the_documented_model_input_and_key_auth(fal, mock, make_job, deadline):
    routes = happy_queue(mock)
    await fal.generate(make_job(seed=7, n=2, steps=6, output_format="webp", guidance_scale=3.5), deadline)

    request = routes["submit"].calls.last.request
    body = json.loads(request.content)
    assert body == {
        "prompt": "a red fox in the snow",
        "image_size": {"width": 1024, "height": 1024},
        "num_images": 2,
        "num_inference_steps": 6,
        "seed": 7,
        "output_format": "webp",
        "enable_safety_checker": True,
    }  # no guidance_scale on the distilled endpoint, no sync_mode for url responses
    assert 1 < int(request.headers["x-fal-request-timeout"]) <= 5
    for route in routes.values():
        assert all(call.request.headers["authorization"] == f"Key {KEY}" for call in route.calls)


async def test_edit_submits_to_the_edit_path_and_follows_owner_alias_urls(fal, mock, make_job, deadline):
    submit = mock.post(SUBMIT_EDIT).respond(200, json={"request_id": RID})  # no URLs: the adapter builds them
    mock.get(STATUS).respond(200, json={"status": "COMPLETED"})
    mock.get(RESULT).respond(200, json=output())
    refs = (
        ReferenceImage(content_type="image/png", data=PNG_BYTES, width=64, height=64),
        ReferenceImage(content_type="image/jpeg", url="https://example.com/cat.jpg"),
    )

    result = await fal.generate(make_job(kind=JobKind.EDIT, references=refs), deadline)

    body = json.loads(submit.calls.last.request.content)
    assert body["image_urls"] == ["data:image/png;base64," + base64.b64encode(PNG_BYTES).decode(), "https://example.com/cat.jpg"]
    assert body["image_size"] == {"width": 1024, "height": 1024}
    assert len(result.images) == 1


async def test_b64_json_request_uses_sync_mode_and_keeps_the_base64(fal, mock, make_job, deadline):
    data_uri = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    routes = happy_queue(mock, result=output(url=data_uri))

    result = await fal.generate(make_job(response_format="b64_json"), deadline)

    assert json.loads(routes["submit"].calls.last.request.content)["sync_mode"] is True
    image = result.images[0]
    assert (image.b64, image.data, image.url) == (data_uri.partition(",")[2], None, None)


@pytest.mark.parametrize(("option", "sent"), [(None, False), (True, True), (False, False)])
async def test_sync_mode_option_overrides_auto(make_settings, http_client, mock, make_job, deadline, option, sent):
    adapter = FalAdapter(make_settings("fal", BASE, KEY, **({} if option is None else {"sync_mode": option})), http_client)
    routes = happy_queue(mock)
    await adapter.generate(make_job(), deadline)
    assert json.loads(routes["submit"].calls.last.request.content).get("sync_mode", False) is sent


async def test_start_timeout_can_be_turned_off(make_settings, http_client, mock, make_job, deadline):
    adapter = FalAdapter(make_settings("fal", BASE, KEY, start_timeout_s=None), http_client)
    routes = happy_queue(mock)
    await adapter.generate(make_job(), deadline)
    assert "x-fal-request-timeout" not in routes["submit"].calls.last.request.headers


async def test_partly_flagged_output_is_returned_with_flags(fal, mock, make_job, deadline):
    happy_queue(mock, result=output(n=2, nsfw=[True, False]))
    result = await fal.generate(make_job(n=2), deadline)
    assert [image.nsfw for image in result.images] == [True, False]


async def test_transient_status_and_result_errors_are_waited_out(fal, mock, make_job, deadline):
    mock.post(SUBMIT).respond(200, json=submitted())
    mock.get(STATUS).mock(side_effect=[httpx.Response(503), httpx.ReadTimeout("slow"), status("COMPLETED")])
    mock.get(RESULT).mock(side_effect=[httpx.Response(502, text="<html>502 Bad Gateway nginx</html>"), httpx.Response(200, json=output())])
    result = await fal.generate(make_job(), deadline)
    assert result.job_id == RID


# ---- URLs that must not receive the key ----------------------------------------


@pytest.mark.parametrize(
    "foreign",
    [
        "https://evil.test/fal-ai/flux-2/requests/80e7-req",
        "http://queue.fal.test/fal-ai/flux-2/requests/80e7-req",  # scheme downgrade
        "https://queue.fal.test:8443/fal-ai/flux-2/requests/80e7-req",  # another port
        "https://queue.fal.test@evil.test/fal-ai/flux-2/requests/80e7-req",  # userinfo trick
        "https://queue.fal.test.evil.test/fal-ai/flux-2/requests/80e7-req",
    ],
)
async def test_foreign_queue_urls_are_not_followed_with_the_key(fal, mock, make_job, deadline, foreign):
    mock.post(SUBMIT).respond(200, json=submitted(status_url=foreign + "/status", response_url=foreign, cancel_url=foreign + "/cancel"))
    status_route = mock.get(STATUS).respond(200, json={"status": "COMPLETED"})
    result_route = mock.get(RESULT).respond(200, json=output())
    cancel_route = mock.put(CANCEL).respond(202, json={"status": "CANCELLATION_REQUESTED"})
    elsewhere = mock.route(url__regex=r"^(?!https://queue\.fal\.test/).*").respond(200, json={"status": "COMPLETED"})

    await fal.generate(make_job(), deadline)
    assert await fal.cancel(RID) is None  # sent, to the trusted host: a running job is only signalled

    assert status_route.called and result_route.called and cancel_route.called
    assert not elsewhere.called
    sent_to = {(c.request.url.scheme, c.request.url.host, c.request.url.port) for c in mock.calls}
    assert sent_to == {("https", "queue.fal.test", None)}


async def test_returned_urls_under_the_base_are_followed(fal, mock, make_job, deadline):
    own = f"{BASE}/fal-ai/flux-2/requests/{RID}-v2"
    mock.post(SUBMIT).respond(200, json=submitted(status_url=own + "/status", response_url=own))
    followed = mock.get(own + "/status").respond(200, json={"status": "COMPLETED"})
    mock.get(own).respond(200, json=output())
    await fal.generate(make_job(), deadline)
    assert followed.called


# ---- errors ---------------------------------------------------------------------

SUBMIT_ERRORS = [
    # (response or exception, failure, status, code, retry_after, credentials_invalid)
    pytest.param(
        httpx.Response(422, json={"detail": [{"loc": ["body", "num_inference_steps"], "msg": "must be at most 50", "type": "less_than_equal"}]}),
        FailureClass.REJECTED,
        422,
        "less_than_equal",
        None,
        False,
        id="422-detail-list",
    ),
    pytest.param(
        httpx.Response(422, json={"detail": [{"loc": ["body", "prompt"], "msg": "flagged", "type": "content_policy_violation"}]}),
        FailureClass.CONTENT_FILTERED,
        422,
        "content_policy_violation",
        None,
        False,
        id="422-content-policy",
    ),
    pytest.param(
        httpx.Response(503, json={"detail": "No runner available", "error_type": "runner_scheduling_failure"}, headers={"X-Fal-Error-Type": "runner_scheduling_failure"}),
        FailureClass.REFUSED,
        503,
        "runner_scheduling_failure",
        None,
        False,
        id="503-request-error",
    ),
    pytest.param(
        httpx.Response(500, text="oops", headers={"X-Fal-Error-Type": "runner_server_error"}),
        FailureClass.FAILED,
        500,
        "runner_server_error",
        None,
        False,
        id="500-error-type-header-only",
    ),
    pytest.param(
        httpx.Response(504, json={"detail": "Request timed out", "error_type": "request_timeout"}, headers={"X-Fal-Request-Timeout-Type": "user"}),
        FailureClass.FAILED,
        504,
        "request_timeout",
        None,
        False,
        id="504-start-timeout",
    ),
    pytest.param(httpx.Response(401, json={"detail": f"Invalid key {KEY}"}), FailureClass.REFUSED, 401, None, None, True, id="401-echoing-key"),
    pytest.param(httpx.Response(403, json={"detail": "Locked: exhausted balance"}), FailureClass.REFUSED, 403, None, None, True, id="403"),
    pytest.param(httpx.Response(429, json={"detail": "Too many requests"}, headers={"Retry-After": "7"}), FailureClass.REFUSED, 429, None, 7.0, False, id="429-retry-after"),
    pytest.param(httpx.Response(500, json={"detail": "Internal error"}), FailureClass.FAILED, 500, None, None, False, id="500"),
    pytest.param(httpx.Response(404, json={"detail": "Application not found"}), FailureClass.FAILED, 404, None, None, False, id="404-unknown-model"),
    pytest.param(httpx.Response(200, text="<html>not json</html>"), FailureClass.FAILED, 200, None, None, False, id="garbage-body"),
    pytest.param(httpx.Response(200, json={"status": "IN_QUEUE"}), FailureClass.FAILED, 200, None, None, False, id="no-request-id"),
    pytest.param(httpx.ConnectError("refused"), FailureClass.UNREACHABLE, None, None, None, False, id="connect-error"),
]


@pytest.mark.parametrize(("reply", "failure", "status_code", "code", "retry_after", "creds"), SUBMIT_ERRORS)
async def test_submit_errors_are_classified(fal, mock, make_job, deadline, reply, failure, status_code, code, retry_after, creds):
    submit = mock.post(SUBMIT).mock(side_effect=[reply]) if isinstance(reply, Exception) else mock.post(SUBMIT).mock(return_value=reply)
    status_route = mock.get(STATUS).respond(200, json={"status": "COMPLETED"})

    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(), deadline)

    err = caught.value
    assert (err.failure, err.status, err.code, err.retry_after, err.credentials_invalid) == (failure, status_code, code, retry_after, creds)
    assert err.job_id is None and err.billed is False
    assert submit.call_count == 1 and not status_route.called
    assert_no_key(err)


async def test_submit_timeout_is_an_unknown_outcome(fal, mock, make_job, deadline):
    mock.post(SUBMIT).mock(side_effect=httpx.ReadTimeout("no answer"))
    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(), deadline)
    assert caught.value.failure is FailureClass.UNKNOWN_OUTCOME and caught.value.billed


@pytest.mark.parametrize(
    ("reply", "message", "code"),
    [
        (
            httpx.Response(422, json={"detail": [{"loc": ["body", "image_urls", 0], "msg": "Image too large", "type": "image_too_large", "input": "x" * 900}]}),
            "image_urls.0: Image too large",
            "image_too_large",
        ),
        (httpx.Response(503, json={"detail": "Runner gone", "error_type": "runner_disconnected"}), "Runner gone", "runner_disconnected"),
        (httpx.Response(503, json={"detail": "Runner gone"}, headers={"X-Fal-Error-Type": "runner_disconnected"}), "Runner gone", "runner_disconnected"),
        (httpx.Response(502, text="Bad gateway"), "Bad gateway", None),
    ],
)
def test_error_message_is_the_detail_text_and_code_the_error_type(reply, message, code):
    assert error_detail(_json_or_none(reply), reply)[:2] == (message, code)


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


COMPLETED_ERRORS = [
    # (error, error_type, failure, billed)
    ("Image too large", "image_too_large", FailureClass.REJECTED, True),
    ("Runner disconnected", "runner_disconnected", FailureClass.FAILED, False),
    ("Request timed out", "request_timeout", FailureClass.FAILED, False),
    ("Flagged", "content_policy_violation", FailureClass.CONTENT_FILTERED, True),
    ("Malformed request", "bad_request", FailureClass.REJECTED, False),
    ("Cancelled", "client_cancelled", FailureClass.FAILED, True),
    (f"something broke near {KEY}", None, FailureClass.FAILED, True),
]


@pytest.mark.parametrize(("error", "error_type", "failure", "billed"), COMPLETED_ERRORS)
async def test_completed_with_error_is_a_failure_without_fetching_the_result(fal, mock, make_job, deadline, error, error_type, failure, billed):
    mock.post(SUBMIT).respond(200, json=submitted())
    mock.get(STATUS).mock(return_value=status("COMPLETED", error=error, error_type=error_type))
    result_route = mock.get(RESULT).respond(200, json=output())

    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(), deadline)

    err = caught.value
    assert (err.failure, err.billed, err.job_id, err.code) == (failure, billed, RID, error_type)
    assert not result_route.called
    assert_no_key(err)


RESULT_ERRORS = [
    # (result response, failure, billed)
    pytest.param(
        httpx.Response(422, json={"detail": [{"loc": ["body", "image_urls"], "msg": "Could not load image", "type": "image_load_error"}]}, headers={"x-fal-request-id": RID}),
        FailureClass.REJECTED,
        True,
        id="422-validation",
    ),
    pytest.param(httpx.Response(400, json={"detail": f"bad input for {KEY}"}), FailureClass.REJECTED, True, id="400-echoing-key"),
    pytest.param(httpx.Response(500, json={"detail": "Internal error"}, headers={"x-fal-request-id": RID}), FailureClass.FAILED, False, id="500-from-model"),
    pytest.param(
        httpx.Response(504, json={"detail": "Request timed out", "error_type": "request_timeout"}, headers={"X-Fal-Request-Timeout-Type": "user", "x-fal-request-id": RID}),
        FailureClass.FAILED,
        False,
        id="504-start-timeout",
    ),
    pytest.param(httpx.Response(200, text="{not json"), FailureClass.FAILED, True, id="garbage-result"),
    pytest.param(httpx.Response(200, json={"images": []}), FailureClass.FAILED, True, id="no-images"),
    pytest.param(httpx.Response(200, json={"images": [{"content_type": "image/png"}]}), FailureClass.FAILED, True, id="image-without-url"),
    pytest.param(httpx.Response(200, json={"images": [{"url": "data:image/png;base64,@@@"}]}), FailureClass.FAILED, True, id="broken-data-uri"),
    pytest.param(httpx.Response(200, json=output(n=2, nsfw=[True, True])), FailureClass.CONTENT_FILTERED, True, id="all-flagged-nsfw"),
]


@pytest.mark.parametrize(("reply", "failure", "billed"), RESULT_ERRORS)
async def test_result_fetch_failures_are_classified(fal, mock, make_job, deadline, reply, failure, billed):
    mock.post(SUBMIT).respond(200, json=submitted())
    mock.get(STATUS).mock(return_value=status("COMPLETED"))
    mock.get(RESULT).mock(return_value=reply)

    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(n=2), deadline)

    err = caught.value
    assert (err.failure, err.billed, err.job_id) == (failure, billed, RID)
    assert_no_key(err)


@pytest.mark.parametrize(
    ("status_reply", "failure", "creds"),
    [
        pytest.param(status("FAILED"), FailureClass.FAILED, False, id="unknown-status"),
        pytest.param(httpx.Response(200, text="garbage"), FailureClass.UNKNOWN_OUTCOME, False, id="garbage-status"),
        pytest.param(httpx.Response(401, json={"detail": "Unauthorized"}), FailureClass.UNKNOWN_OUTCOME, True, id="401-while-following"),
        pytest.param(httpx.ReadTimeout("slow"), FailureClass.UNKNOWN_OUTCOME, False, id="timeout-after-job-id"),
        pytest.param(httpx.ConnectError("reset"), FailureClass.UNKNOWN_OUTCOME, False, id="connection-lost-after-job-id"),
        pytest.param(httpx.Response(503), FailureClass.UNKNOWN_OUTCOME, False, id="status-keeps-failing"),
    ],
)
async def test_status_poll_failures_after_submit_carry_the_job_id(fal, mock, make_job, deadline, status_reply, failure, creds):
    mock.post(SUBMIT).respond(200, json=submitted())
    if isinstance(status_reply, Exception):
        poll = mock.get(STATUS).mock(side_effect=status_reply)
    else:
        poll = mock.get(STATUS).mock(return_value=status_reply)

    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(), deadline)

    err = caught.value
    assert (err.failure, err.job_id, err.billed, err.credentials_invalid) == (failure, RID, True, creds)
    assert poll.call_count <= 6  # bounded patience: max_poll_errors (5) + 1
    assert_no_key(err)


async def test_deadline_while_in_progress_is_an_unknown_outcome_with_job_id(fal, mock, make_job):
    mock.post(SUBMIT).respond(200, json=submitted())
    mock.get(STATUS).mock(return_value=status("IN_PROGRESS"))
    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(), time.monotonic() + 0.05)
    assert (caught.value.failure, caught.value.job_id) == (FailureClass.UNKNOWN_OUTCOME, RID)


async def test_missing_key_is_refused_without_a_request(make_settings, http_client, mock, make_job, deadline):
    adapter = FalAdapter(make_settings("fal", BASE, None), http_client)
    submit = mock.post(SUBMIT).respond(200, json=submitted())
    with pytest.raises(ProviderError) as caught:
        await adapter.generate(make_job(), deadline)
    assert caught.value.failure is FailureClass.REFUSED and caught.value.credentials_invalid
    assert not submit.called


# ---- cancel ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "accepted"),
    [
        (httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}), None),  # running: only signalled, may still bill
        (httpx.Response(200, json={"status": "OK"}), True),  # removed from the queue: never runs
        (httpx.Response(202, content=b""), True),
        (httpx.Response(404, json={"status": "NOT_FOUND"}), False),
        (httpx.Response(200, json={"status": "NOT_FOUND"}), False),
        (httpx.ConnectError("down"), False),
    ],
)
async def test_cancel_puts_the_cancel_url_and_ignores_errors(fal, mock, reply, accepted):
    route = mock.put(CANCEL).mock(side_effect=[reply])
    assert await fal.cancel(RID) is accepted
    assert route.call_count == 1
    assert route.calls.last.request.headers["authorization"] == f"Key {KEY}"


# A cancel that comes after the job ended: how it ended says whether it bills.
# This is the race of a job dropped by its X-Fal-Request-Timeout just as the
# gateway's attempt ran out of time.
@pytest.mark.parametrize(
    ("cancel_status", "end", "never_bills"),
    [
        (400, status("COMPLETED", error="Request timed out before a runner started it", error_type="request_timeout"), True),
        (200, status("COMPLETED", error="Request timed out before a runner started it", error_type="request_timeout"), True),
        (400, status("COMPLETED", error="runner gone", error_type="runner_disconnected"), True),  # infrastructure: not billed
        (400, status("COMPLETED"), False),  # it made its image: billed
        (400, status("COMPLETED", error="boom", error_type="internal_server_error_of_the_model"), False),  # the runner's failure: billed
        (400, status("COMPLETED", error="Cancelled", error_type="client_cancelled"), False),
        (400, httpx.Response(500), False),  # its end could not be read
        (400, httpx.ReadTimeout("slow"), False),
    ],
)
async def test_cancel_of_an_ended_job_reads_its_end_once(fal, mock, cancel_status, end, never_bills):
    mock.put(CANCEL).respond(cancel_status, json={"status": "ALREADY_COMPLETED"})
    read = mock.get(STATUS).mock(side_effect=[end])
    assert await fal.cancel(RID) is never_bills
    assert read.call_count == 1
    assert read.calls.last.request.headers["authorization"] == f"Key {KEY}"


async def test_cancel_after_a_deadline_uses_the_remembered_cancel_url(fal, mock, make_job):
    remembered = f"{BASE}/fal-ai/flux-2/requests/{RID}/cancel-here"
    mock.post(SUBMIT).respond(200, json=submitted(cancel_url=remembered))
    mock.get(STATUS).mock(return_value=status("IN_QUEUE"))
    route = mock.put(remembered).respond(200, json={"status": "OK"})
    with pytest.raises(ProviderError) as caught:
        await fal.generate(make_job(), time.monotonic() + 0.05)
    assert await fal.cancel(caught.value.job_id) is True and route.called


# ---- probe ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        (httpx.Response(404, json={"detail": "Request not found"}), True),
        (httpx.Response(400, json={"detail": "bad id"}), True),
        (httpx.Response(401, json={"detail": "Unauthorized"}), False),
        (httpx.Response(403, json={"detail": "Forbidden"}), False),
        (httpx.Response(429), False),
        (httpx.Response(503), False),
        (httpx.ConnectError("down"), False),
    ],
)
async def test_probe_is_free_and_reads_auth_from_a_status_lookup(fal, mock, reply, ok):
    submits = mock.post(url__startswith=BASE).respond(200, json=submitted())
    lookup = mock.get(f"{BASE}/fal-ai/flux-2/requests/00000000-0000-0000-0000-000000000000/status").mock(side_effect=[reply])
    result = await fal.probe()
    assert result.ok is ok and lookup.call_count == 1
    assert submits.call_count == 0
    assert KEY not in result.detail
    assert result.credentials_invalid is (isinstance(reply, httpx.Response) and reply.status_code in (401, 403))


async def test_probe_path_is_configurable(make_settings, http_client, mock):
    adapter = FalAdapter(make_settings("fal", BASE, KEY, probe_path="/health/ping"), http_client)
    route = mock.get(f"{BASE}/health/ping").respond(200)
    submits = mock.post(url__startswith=BASE).respond(200)
    assert (await adapter.probe()).ok and route.called and not submits.called


async def test_probe_without_a_key_sends_nothing(make_settings, http_client, mock):
    adapter = FalAdapter(make_settings("fal", BASE, None), http_client)
    anything = mock.route().respond(404)
    assert not (await adapter.probe()).ok and not anything.called


# ---- pure parts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "app"),
    [
        ("fal-ai/flux-2/klein/4b", "fal-ai/flux-2"),
        ("fal-ai/flux-2/klein/4b/edit", "fal-ai/flux-2"),
        ("/fal-ai/fast-sdxl/", "fal-ai/fast-sdxl"),
        ("workflows/acme/my-flow/run", "workflows/acme/my-flow"),
        ("comfy/acme/graph", "comfy/acme/graph"),
    ],
)
def test_queue_app_keeps_owner_and_alias_only(endpoint, app):
    assert queue_app(endpoint) == app


def test_an_endpoint_without_alias_is_refused_at_construction(make_settings, http_client):
    with pytest.raises(ValueError):
        FalAdapter(make_settings("fal", BASE, KEY, model="flux"), http_client)


def test_capabilities_follow_the_documented_limits():
    caps = FalAdapter.capabilities_for({})
    assert (caps.min_side, caps.max_side, caps.multiple_of, caps.max_n, caps.min_steps, caps.max_steps, caps.max_references) == (64, 2048, 16, 4, 1, 50, 4)
    assert caps.accepts_data_uri_refs and caps.exact_sizes is None
