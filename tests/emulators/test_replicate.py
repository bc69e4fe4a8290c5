"""Replicate emulator: predictions, Prefer: wait, polling, sizes, cancel, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.emulators.replicate import parse_duration, parse_prefer_wait
from tests.emulators.sizes import replicate_size
from tests.emulators.support import auth, decode, knobs, stats

CREATE = "/v1/models/black-forest-labs/flux-2-klein-4b/predictions"


async def create(client, fleet, inputs, **headers):
    return await client.post(fleet["replicate"].base_url + CREATE, json={"input": inputs}, headers=auth(fleet, "replicate") | headers)


@pytest.mark.parametrize(
    ("aspect_ratio", "megapixels", "fmt", "expected", "pil"),
    [
        ("1:1", "1", "png", (1024, 1024), "PNG"),
        ("16:9", "1", "jpg", (1365, 768), "JPEG"),
        ("9:16", "1", "webp", (768, 1365), "WEBP"),
        ("4:3", "1", "jpg", (1183, 887), "JPEG"),
        ("1:1", "0.25", "png", (512, 512), "PNG"),
    ],
)
async def test_prefer_wait_returns_succeeded_with_uri_array_of_the_table_size(client, fleet, aspect_ratio, megapixels, fmt, expected, pil):
    response = await create(client, fleet, {"prompt": "a red fox", "aspect_ratio": aspect_ratio, "output_megapixels": megapixels, "output_format": fmt}, Prefer="wait")
    assert response.status_code == 201
    prediction = response.json()
    assert prediction["status"] == "succeeded" and prediction["model"] == "black-forest-labs/flux-2-klein-4b"
    assert isinstance(prediction["output"], list) and len(prediction["output"]) == 1
    url = prediction["output"][0]
    assert url.endswith("." + fmt)
    image = decode((await client.get(url)).content)
    assert image.size == expected and image.format == pil


async def test_prefer_wait_shorter_than_the_job_returns_starting_then_polling_succeeds(client, fleet):
    await knobs(client, fleet, "replicate", {"job": {"queue_ms": 1500, "run_ms": 150}})
    started = time.monotonic()
    response = await create(client, fleet, {"prompt": "a red fox"}, Prefer="wait=1")
    held = time.monotonic() - started
    prediction = response.json()
    assert response.status_code == 201 and prediction["status"] == "starting" and prediction["output"] is None
    assert 0.9 <= held < 1.5
    seen = ["starting"]
    for _ in range(200):
        body = (await client.get(prediction["urls"]["get"], headers=auth(fleet, "replicate"))).json()
        if body["status"] != seen[-1]:
            seen.append(body["status"])
        if body["status"] == "succeeded":
            break
        await asyncio.sleep(0.01)
    assert seen == ["starting", "processing", "succeeded"]
    assert body["metrics"]["predict_time"] == pytest.approx(0.15) and body["completed_at"]


async def test_without_prefer_the_prediction_comes_back_at_once(client, fleet):
    await knobs(client, fleet, "replicate", {"job": {"run_ms": 5000}})
    started = time.monotonic()
    prediction = (await create(client, fleet, {"prompt": "a red fox"})).json()
    assert time.monotonic() - started < 0.5
    assert prediction["status"] in ("starting", "processing")
    assert prediction["urls"]["get"].startswith(fleet["replicate"].base_url + "/v1/predictions/")


async def test_create_by_version_works_too(client, fleet):
    response = await client.post(
        fleet["replicate"].base_url + "/v1/predictions",
        json={"version": "8e9c42d7", "input": {"prompt": "a red fox"}},
        headers=auth(fleet, "replicate") | {"Prefer": "wait"},
    )
    assert response.status_code == 201 and response.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({}, "input.prompt"),
        ({"prompt": "x", "aspect_ratio": "7:5"}, "input.aspect_ratio"),
        ({"prompt": "x", "output_megapixels": 1}, "input.output_megapixels"),  # must be a string
        ({"prompt": "x", "output_format": "gif"}, "input.output_format"),
    ],
)
async def test_invalid_input_is_a_422_problem_details(client, fleet, inputs, field):
    response = await create(client, fleet, inputs)
    assert response.status_code == 422
    body = response.json()
    assert body["status"] == 422 and body["title"] and body["detail"]
    assert body["invalid_fields"][0]["field"] == field
    assert (await stats(client, fleet, "replicate"))["generations"] == 0


async def test_cancel_returns_the_prediction_canceled(client, fleet):
    await knobs(client, fleet, "replicate", {"job": {"run_ms": 5000}})
    prediction = (await create(client, fleet, {"prompt": "a red fox"})).json()
    response = await client.post(prediction["urls"]["cancel"], headers=auth(fleet, "replicate"))
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    again = (await client.get(prediction["urls"]["get"], headers=auth(fleet, "replicate"))).json()
    assert again["status"] == "canceled"
    assert (await stats(client, fleet, "replicate"))["cancels"] == 1


async def test_cancel_after_aborts_a_prediction_that_has_not_started(client, fleet):
    await knobs(client, fleet, "replicate", {"job": {"queue_ms": 5000}})
    prediction = (await create(client, fleet, {"prompt": "a red fox"}, **{"Cancel-After": "100ms"})).json()
    await asyncio.sleep(0.15)
    body = (await client.get(prediction["urls"]["get"], headers=auth(fleet, "replicate"))).json()
    assert body["status"] == "aborted" and body["started_at"] is None


@pytest.mark.parametrize(
    ("fault_knobs", "error_part"),
    [
        ({"faults": {"queue": ["job_failed"]}}, "Prediction failed"),
        ({"nsfw_rate": 1.0}, "NSFW"),
    ],
)
async def test_failed_predictions_are_http_200_with_status_failed(client, fleet, fault_knobs, error_part):
    await knobs(client, fleet, "replicate", fault_knobs)
    response = await create(client, fleet, {"prompt": "a red fox"}, Prefer="wait")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "failed" and error_part in body["error"] and body["output"] is None


async def test_disable_safety_checker_lets_flagged_images_through(client, fleet):
    await knobs(client, fleet, "replicate", {"nsfw_rate": 1.0})
    body = (await create(client, fleet, {"prompt": "a red fox", "disable_safety_checker": True}, Prefer="wait")).json()
    assert body["status"] == "succeeded"


async def test_unknown_prediction_is_404_problem_details(client, fleet):
    response = await client.get(fleet["replicate"].base_url + "/v1/predictions/nope", headers=auth(fleet, "replicate"))
    assert response.status_code == 404 and response.json()["status"] == 404


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 0.0), ("wait", 60.0), ("wait=5", 5.0), ("wait=600", 60.0), ("wait=0", 1.0), ("respond-async", 0.0)],
)
def test_prefer_wait_parsing(header, expected):
    assert parse_prefer_wait(header) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45.0), ("1m", 60.0), ("1m30s", 90.0), ("500ms", 0.5), ("2", 2.0), ("soon", None)],
)
def test_cancel_after_duration_parsing(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("ratio", "megapixels", "size"),
    [("1:1", "4", (2048, 2048)), ("16:9", "1", (1365, 768)), ("21:9", "1", (1563, 670)), ("1:1", "0.5", (724, 724))],
)
def test_replicate_size_table(ratio, megapixels, size):
    assert replicate_size(ratio, megapixels) == size


def test_match_input_image_takes_the_reference_ratio():
    assert replicate_size("match_input_image", "1", (2000, 1000)) == (1448, 724)
    assert replicate_size("match_input_image", "1", None) == (1024, 1024)
