"""Runflow emulator: runs, status progression, output shape, cost, errors."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from tests.emulators.jobs import Spec
from tests.emulators.runflow import run_cost
from tests.emulators.support import auth, decode, knobs, stats

MODEL = "/v1/models/black-forest-labs/flux-2-klein-4b"


async def create(client, fleet, inputs, path=MODEL + "/runs", **extra):
    return await client.post(fleet["runflow"].base_url + path, json={"input": inputs, **extra}, headers=auth(fleet, "runflow"))


async def get_run(client, fleet, run_id):
    response = await client.get(f"{fleet['runflow'].base_url}/v1/runs/{run_id}", headers=auth(fleet, "runflow"))
    return response


async def test_run_moves_queued_dispatching_running_succeeded(client, fleet):
    await knobs(client, fleet, "runflow", {"job": {"queue_ms": 100, "dispatch_ms": 100, "run_ms": 100}})
    response = await create(client, fleet, {"prompt": "a red fox"}, client_ref="req_1")
    assert response.status_code == 201
    run = response.json()
    assert run["status_code"] == "queued" and run["id"].startswith("run_") and run["client_ref"] == "req_1"
    assert run["output"] is None and run["cost"] == "0"
    seen = ["queued"]
    for _ in range(300):
        run = (await get_run(client, fleet, run["id"])).json()
        if run["status_code"] != seen[-1]:
            seen.append(run["status_code"])
        if run["status_code"] == "succeeded":
            break
        await asyncio.sleep(0.01)
    assert seen == ["queued", "dispatching", "running", "succeeded"]
    assert run["completed_at"].endswith("+00:00") and run["duration_ms"] >= 300


@pytest.mark.parametrize(
    ("inputs", "expected", "fmt"),
    [
        ({"prompt": "a fox", "image_size": "square_hd", "output_format": "png"}, (1024, 1024), "PNG"),
        ({"prompt": "a fox", "image_size": {"width": 768, "height": 512}, "output_format": "webp"}, (768, 512), "WEBP"),
        ({"prompt": "a fox", "width": 512, "height": 768, "output_format": "jpeg"}, (512, 768), "JPEG"),
        ({"prompt": "a fox"}, (1024, 768), "PNG"),
    ],
)
async def test_succeeded_output_is_normalised_with_decodable_images(client, fleet, inputs, expected, fmt):
    run = (await create(client, fleet, inputs | {"num_images": 2, "seed": 11})).json()
    run = (await get_run(client, fleet, run["id"])).json()
    output = run["output"]
    assert run["status_code"] == "succeeded" and output["seed"] == 11 and output["nsfw_detected"] is False
    assert len(output["outputs"]) == 2
    for item in output["outputs"]:
        assert item["type"] == "image" and (item["width"], item["height"]) == expected
        image = decode((await client.get(item["url"])).content)
        assert image.size == expected and image.format == fmt
    assert Decimal(run["cost"]) == run_cost(Spec("a fox", *expected, n=2), edit=False)


async def test_edit_run_defaults_to_jpeg_1024_and_costs_per_image(client, fleet):
    run = (await create(client, fleet, {"prompt": "bluer", "image_urls": ["https://example.com/a.png"], "steps": 4}, path=MODEL + "/edit/runs")).json()
    run = (await get_run(client, fleet, run["id"])).json()
    assert run["model_id"].endswith("/edit") and run["cost"] == "0.005"
    item = run["output"]["outputs"][0]
    assert decode((await client.get(item["url"])).content).format == "JPEG"
    assert (item["width"], item["height"]) == (1024, 1024)


async def test_short_model_path_is_served_too(client, fleet):
    response = await create(client, fleet, {"prompt": "a fox"}, path="/v1/models/flux-2-klein-4b/runs")
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("inputs", "path", "field"),
    [
        ({}, MODEL + "/runs", "input.prompt"),
        ({"prompt": "x", "num_images": 5}, MODEL + "/runs", "input.num_images"),
        ({"prompt": "x", "image_size": "giant"}, MODEL + "/runs", "input.image_size"),
        ({"prompt": "x"}, MODEL + "/edit/runs", "input.image_urls"),
        ({"prompt": "x", "image_urls": ["u"], "steps": 30}, MODEL + "/edit/runs", "input.steps"),
    ],
)
async def test_invalid_input_is_422_with_field_errors(client, fleet, inputs, path, field):
    response = await create(client, fleet, inputs, path=path)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR" and body["errors"][0]["field"] == field


async def test_job_failed_fault_gives_failure_code_and_no_cost(client, fleet):
    await knobs(client, fleet, "runflow", {"faults": {"queue": ["job_failed"]}})
    run = (await create(client, fleet, {"prompt": "a fox"})).json()
    run = (await get_run(client, fleet, run["id"])).json()
    assert run["status_code"] == "failed"
    assert run["failure_code"] == "PROVIDER_ERROR" and run["failure_message"]
    assert run["error"]["code"] == "PROVIDER_ERROR" and run["cost"] == "0" and run["output"] is None


@pytest.mark.parametrize("spelling", ["canceled", "cancelled"])
async def test_admin_cancellation_uses_the_configured_spelling(client, fleet, spelling):
    await knobs(client, fleet, "runflow", {"cancel_spelling": spelling, "job": {"queue_ms": 5000}})
    run = (await create(client, fleet, {"prompt": "a fox"})).json()
    url = f"{fleet['runflow'].base_url}/v1/admin/runs/{run['id']}/cancellation"
    first = await client.post(url, json={"reason": "test"}, headers=auth(fleet, "runflow"))
    assert first.status_code == 201 and first.json()["status_code"] == spelling
    second = await client.post(url, json={"reason": "test"}, headers=auth(fleet, "runflow"))
    assert second.status_code == 200
    assert (await stats(client, fleet, "runflow"))["cancels"] == 1


async def test_unknown_run_is_run_not_found(client, fleet):
    response = await get_run(client, fleet, "run_nope")
    assert response.status_code == 404 and response.json()["code"] == "RUN_NOT_FOUND"


async def test_health_needs_no_key(client, fleet):
    response = await client.get(fleet["runflow"].base_url + "/v1/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("width", "height", "n", "edit", "usd"),
    [
        (1024, 1024, 1, False, "0.014048576"),  # docs/design.md#worked-examples
        (512, 512, 1, False, "0.014"),
        (1024, 1024, 2, True, "0.010"),
    ],
)
def test_run_cost(width, height, n, edit, usd):
    assert run_cost(Spec("p", width, height, n=n), edit=edit) == Decimal(usd)
