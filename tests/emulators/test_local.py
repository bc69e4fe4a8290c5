"""Local backend emulator: the local_backend.schemas API, queue bound, cost figure."""

from __future__ import annotations

import asyncio
import base64

import pytest

from local_backend.schemas import BackendInfo, GenerateResponse
from tests.emulators.support import decode, knobs, stats

GENERATE = "/v1/images/generations"


async def generate(client, fleet, body, **kw):
    return await client.post(fleet["local"].base_url + GENERATE, json=body, **kw)


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_generate_matches_the_schema_with_per_image_seeds(client, fleet, fmt, pil):
    response = await generate(client, fleet, {"prompt": "a red fox", "width": 512, "height": 256, "num_images": 3, "seed": 40, "output_format": fmt})
    assert response.status_code == 200
    body = GenerateResponse.model_validate(response.json())
    assert body.seed == 40 and [im.seed for im in body.images] == [40, 41, 42]
    for im in body.images:
        assert (im.width, im.height) == (512, 256) and im.content_type == f"image/{fmt}" and im.nsfw is None
        image = decode(base64.b64decode(im.b64_json))
        assert image.size == (512, 256) and image.format == pil
    # 3 images of busy time at 0.57 s per 1024x1024 image, scaled to 512x256 (an eighth of the pixels)
    assert body.cost_usd_estimate == pytest.approx(3 * 2.5 * 0.57 / 3600 * (512 * 256) / (1024 * 1024))


async def test_schema_violations_are_422_error_envelopes(client, fleet):
    response = await generate(client, fleet, {"prompt": "x", "width": 100, "height": 256})  # not a multiple of 16
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request_error" and "width" in response.json()["error"]["message"]


async def test_full_queue_answers_429_with_retry_after(client, fleet):
    await knobs(client, fleet, "local", {"job": {"run_ms": 400}, "local": {"max_concurrency": 1, "queue_capacity": 1}})
    body = {"prompt": "a red fox", "width": 256, "height": 256}
    first = asyncio.create_task(generate(client, fleet, body))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(generate(client, fleet, body))
    await asyncio.sleep(0.05)
    info = BackendInfo.model_validate((await client.get(fleet["local"].base_url + "/v1/info")).json())
    assert info.queue_depth == 1 and info.queue_capacity == 1 and info.estimated_wait_s > 0
    third = await generate(client, fleet, body)
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["code"] == "queue_full"
    done = await asyncio.gather(first, second)
    assert [r.status_code for r in done] == [200, 200]
    assert done[1].json()["timings"]["queue_ms"] > 200  # it waited for the first


async def test_deadline_passed_while_queued_is_504(client, fleet):
    await knobs(client, fleet, "local", {"job": {"run_ms": 500}})
    body = {"prompt": "a red fox", "width": 256, "height": 256}
    first = asyncio.create_task(generate(client, fleet, body))
    await asyncio.sleep(0.05)
    late = await generate(client, fleet, body | {"timeout_s": 0.1})
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert (await first).status_code == 200


async def test_warming_up_is_503_and_ready_probe_says_so(client, fleet):
    await knobs(client, fleet, "local", {"local": {"ready": False}})
    base = fleet["local"].base_url
    assert (await client.get(base + "/health/ready")).status_code == 503
    assert (await client.get(base + "/health/live")).status_code == 200
    response = await generate(client, fleet, {"prompt": "a red fox", "width": 256, "height": 256})
    assert response.status_code == 503 and "retry-after" in response.headers


async def test_info_reports_the_configured_live_cost(client, fleet):
    await knobs(client, fleet, "local", {"local": {"gpu_usd_per_hour": 3.6, "seconds_per_image": 1.0, "utilisation": 0.5}})
    info = BackendInfo.model_validate((await client.get(fleet["local"].base_url + "/v1/info")).json())
    assert info.cost.marginal_usd_per_image == pytest.approx(0.001)
    assert info.cost.amortized_usd_per_image == pytest.approx(0.002)
    metrics = (await client.get(fleet["local"].base_url + "/metrics")).text
    assert 'local_backend_cost_per_image_usd{kind="marginal"} 0.001' in metrics
    assert (await stats(client, fleet, "local"))["generations"] == 0


async def test_nsfw_flags_only_with_the_safety_checker_on(client, fleet):
    await knobs(client, fleet, "local", {"nsfw_rate": 1.0})
    on = (await generate(client, fleet, {"prompt": "x", "width": 256, "height": 256, "enable_safety_checker": True})).json()
    off = (await generate(client, fleet, {"prompt": "x", "width": 256, "height": 256})).json()
    assert on["images"][0]["nsfw"] is True and off["images"][0]["nsfw"] is None
