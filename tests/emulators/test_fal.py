"""fal queue emulator: submit, status transitions, result, cancel, errors."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from tests.emulators.support import auth, decode, knobs, stats

SUBMIT = "/fal-ai/flux-2/klein/4b"
REQUESTS = "/fal-ai/flux-2/requests"


async def submit(client, fleet, body, path=SUBMIT):
    response = await client.post(fleet["fal"].base_url + path, json=body, headers=auth(fleet, "fal"))
    assert response.status_code == 200, response.text
    return response.json()


async def test_submit_returns_queue_urls_under_owner_alias_on_the_request_host(client, fleet):
    body = await submit(client, fleet, {"prompt": "a red fox"})
    base = fleet["fal"].base_url
    rid = body["request_id"]
    assert body["status"] == "IN_QUEUE" and body["queue_position"] == 0
    assert body["response_url"] == f"{base}{REQUESTS}/{rid}"
    assert body["status_url"] == f"{base}{REQUESTS}/{rid}/status"
    assert body["cancel_url"] == f"{base}{REQUESTS}/{rid}/cancel"


@pytest.mark.parametrize(
    ("image_size", "fmt", "expected"),
    [
        ("square_hd", "png", (1024, 1024)),
        ("landscape_16_9", "jpeg", (1024, 576)),
        ("portrait_4_3", "webp", (768, 1024)),
        ({"width": 640, "height": 384}, "png", (640, 384)),
        (None, "png", (1024, 768)),  # landscape_4_3, the default
    ],
)
async def test_result_images_decode_at_the_requested_size_and_format(client, fleet, image_size, fmt, expected):
    body = {"prompt": "a red fox", "output_format": fmt, "num_images": 2, "seed": 7}
    if image_size is not None:
        body["image_size"] = image_size
    job = await submit(client, fleet, body)
    result = await client.get(job["response_url"], headers=auth(fleet, "fal"))
    assert result.status_code == 200
    out = result.json()
    assert out["seed"] == 7 and out["prompt"] == "a red fox" and out["has_nsfw_concepts"] == [False, False]
    assert len(out["images"]) == 2
    for item in out["images"]:
        assert (item["width"], item["height"]) == expected
        assert item["content_type"] == f"image/{fmt}"
        file = await client.get(item["url"])
        image = decode(file.content)
        assert image.size == expected
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert file.headers["content-type"] == f"image/{fmt}"


async def test_status_moves_from_in_queue_to_in_progress_to_completed(client, fleet):
    await knobs(client, fleet, "fal", {"job": {"queue_ms": 120, "run_ms": 120}})
    job = await submit(client, fleet, {"prompt": "a red fox"})
    seen: list[str] = []
    for _ in range(200):
        status = (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()
        if not seen or seen[-1] != status["status"]:
            seen.append(status["status"])
        if status["status"] == "COMPLETED":
            assert status["metrics"]["inference_time"] == pytest.approx(0.12)
            break
        await asyncio.sleep(0.01)
    assert seen == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


async def test_result_before_completion_is_400_still_in_progress(client, fleet):
    await knobs(client, fleet, "fal", {"job": {"run_ms": 5000}})
    job = await submit(client, fleet, {"prompt": "a red fox"})
    result = await client.get(job["response_url"], headers=auth(fleet, "fal"))
    assert result.status_code == 400
    assert "in progress" in result.json()["detail"]


async def test_edit_endpoint_takes_the_first_data_uri_size_when_no_image_size(client, fleet):
    buf = io.BytesIO()
    Image.new("RGB", (320, 192), "red").save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    job = await submit(client, fleet, {"prompt": "make it blue", "image_urls": [uri]}, path=SUBMIT + "/edit")
    out = (await client.get(job["response_url"], headers=auth(fleet, "fal"))).json()
    assert (out["images"][0]["width"], out["images"][0]["height"]) == (320, 192)
    assert (await stats(client, fleet, "fal"))["requests"]["submit_edit"] == 1


async def test_sync_mode_returns_inline_data_uris(client, fleet):
    job = await submit(client, fleet, {"prompt": "a red fox", "image_size": "square", "sync_mode": True})
    out = (await client.get(job["response_url"], headers=auth(fleet, "fal"))).json()
    url = out["images"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert decode(base64.b64decode(url.split(",", 1)[1])).size == (512, 512)


@pytest.mark.parametrize(
    ("body", "path", "field", "kind"),
    [
        ({}, SUBMIT, "prompt", "missing"),
        ({"prompt": "x", "image_size": "huge"}, SUBMIT, "image_size", "enum"),
        ({"prompt": "x", "num_images": 9}, SUBMIT, "num_images", "less_than_equal"),
        ({"prompt": "x"}, SUBMIT + "/edit", "image_urls", "missing"),
    ],
)
async def test_invalid_input_completes_with_error_and_the_result_is_a_422_detail_list(client, fleet, body, path, field, kind):
    job = await submit(client, fleet, body, path=path)  # fal accepts at submit (docs/providers/fal.md#status-flow)
    status = (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == kind and status["error"]
    result = await client.get(job["response_url"], headers=auth(fleet, "fal"))
    assert result.status_code == 422
    detail = result.json()["detail"]
    assert detail[0]["loc"] == ["body", field] and detail[0]["type"] == kind


async def test_job_failed_fault_is_completed_with_error_then_422(client, fleet):
    await knobs(client, fleet, "fal", {"faults": {"queue": ["job_failed"], "job_error_code": "runner_server_error"}})
    job = await submit(client, fleet, {"prompt": "a red fox"})
    status = (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()
    assert status["status"] == "COMPLETED"
    assert status["error_type"] == "runner_server_error" and "failed" in status["error"]
    result = await client.get(job["response_url"], headers=auth(fleet, "fal"))
    assert result.status_code == 422 and isinstance(result.json()["detail"], list)


@pytest.mark.parametrize(
    ("run_ms", "wait_s", "expected_status", "expected_body"),
    [
        (5000, 0.0, 202, "CANCELLATION_REQUESTED"),  # running (queue 0)
        (0, 0.0, 400, "ALREADY_COMPLETED"),
    ],
)
async def test_cancel_answers_by_job_state(client, fleet, run_ms, wait_s, expected_status, expected_body):
    await knobs(client, fleet, "fal", {"job": {"run_ms": run_ms}})
    job = await submit(client, fleet, {"prompt": "a red fox"})
    await asyncio.sleep(wait_s)
    response = await client.put(job["cancel_url"], headers=auth(fleet, "fal"))
    assert response.status_code == expected_status
    assert response.json()["status"] == expected_body
    assert (await stats(client, fleet, "fal"))["cancels"] == (1 if expected_status == 202 else 0)


async def test_cancel_of_a_queued_job_stops_it_and_unknown_id_is_not_found(client, fleet):
    await knobs(client, fleet, "fal", {"job": {"queue_ms": 5000}})
    job = await submit(client, fleet, {"prompt": "a red fox"})
    cancelled = await client.put(job["cancel_url"], headers=auth(fleet, "fal"))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "OK"  # removed from the queue
    status = (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "request_cancelled"
    missing = await client.put(fleet["fal"].base_url + REQUESTS + "/nope/cancel", headers=auth(fleet, "fal"))
    assert missing.status_code == 404 and missing.json() == {"status": "NOT_FOUND"}


async def test_full_endpoint_path_is_not_a_status_path(client, fleet):
    job = await submit(client, fleet, {"prompt": "a red fox"})
    wrong = await client.get(f"{fleet['fal'].base_url}{SUBMIT}/requests/{job['request_id']}/status", headers=auth(fleet, "fal"))
    assert wrong.status_code == 404


async def test_stuck_job_stays_in_queue(client, fleet):
    await knobs(client, fleet, "fal", {"faults": {"stuck": 1.0}})
    job = await submit(client, fleet, {"prompt": "a red fox"})
    await asyncio.sleep(0.05)
    for _ in range(3):
        status = (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()
        assert status["status"] == "IN_QUEUE"


async def test_request_timeout_header_drops_a_job_no_runner_started(client, fleet):
    await knobs(client, fleet, "fal", {"faults": {"stuck": 1.0}})
    response = await client.post(fleet["fal"].base_url + SUBMIT, json={"prompt": "a red fox"}, headers=auth(fleet, "fal") | {"X-Fal-Request-Timeout": "1.2"})
    job = response.json()
    assert (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()["status"] == "IN_QUEUE"
    await asyncio.sleep(1.25)
    status = (await client.get(job["status_url"], headers=auth(fleet, "fal"))).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "request_timeout"
    result = await client.get(job["response_url"], headers=auth(fleet, "fal"))
    assert result.status_code == 504 and "x-fal-request-timeout-type" in result.headers


async def test_open_jobs_count_what_may_still_run_whichever_way_a_job_ends(client, fleet):
    await knobs(client, fleet, "fal", {"faults": {"stuck": 1.0}})
    dropped = (await client.post(fleet["fal"].base_url + SUBMIT, json={"prompt": "a"}, headers=auth(fleet, "fal") | {"X-Fal-Request-Timeout": "1.2"})).json()
    cancelled = await submit(client, fleet, {"prompt": "b"})
    await submit(client, fleet, {"prompt": "c"})  # stays stuck
    assert (await stats(client, fleet, "fal"))["jobs_open"] == 3
    assert (await client.put(cancelled["cancel_url"], headers=auth(fleet, "fal"))).status_code == 200
    assert (await stats(client, fleet, "fal"))["jobs_open"] == 2
    await asyncio.sleep(1.25)  # the first one's start deadline drops it
    counters = await stats(client, fleet, "fal")
    assert counters["jobs_open"] == 1 and counters["cancels"] == 1
    late = await client.put(dropped["cancel_url"], headers=auth(fleet, "fal"))
    assert (late.status_code, late.json()["status"]) == (400, "ALREADY_COMPLETED")
