"""EmpirioLabs emulator: the sync OpenAI-like call, its limits and its errors."""

from __future__ import annotations

import base64

import pytest

from tests.emulators.support import auth, decode, knobs, stats

GENERATE = "/v1/images/generations"


async def generate(client, fleet, body, headers=None):
    return await client.post(fleet["empiriolabs"].base_url + GENERATE, json=body, headers=auth(fleet, "empiriolabs") if headers is None else headers)


@pytest.mark.parametrize(
    ("extra", "expected", "pil"),
    [
        ({}, (1024, 1024), "WEBP"),  # defaults: 1:1, webp
        ({"size": "1344x768", "format": "png"}, (1344, 768), "PNG"),
        ({"width": 2048, "height": 512, "format": "jpg"}, (2048, 512), "JPEG"),
        ({"aspect_ratio": "9:16", "format": "jpeg"}, (768, 1344), "JPEG"),
    ],
)
async def test_url_response_images_decode_at_the_requested_size_and_format(client, fleet, extra, expected, pil):
    response = await generate(client, fleet, {"model": "flux-2-klein-4b", "prompt": "a red fox", "n": 2} | extra)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    for item in body["data"]:
        assert set(item) == {"url"}
        image = decode((await client.get(item["url"])).content)
        assert image.size == expected and image.format == pil


@pytest.mark.parametrize("ask", [{"response_format": "b64_json"}, {"return_base64": True}])
async def test_b64_json_response(client, fleet, ask):
    body = (await generate(client, fleet, {"prompt": "a red fox", "size": "512x512", "format": "png"} | ask)).json()
    assert set(body["data"][0]) == {"b64_json"}
    assert decode(base64.b64decode(body["data"][0]["b64_json"])).size == (512, 512)


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"size": "2048x2048"}, 422, "size"),  # over 1,048,576 pixels
        ({"width": 128, "height": 1024}, 422, "width"),  # side below 256
        ({"width": 1024, "height": 4096}, 422, "height"),
        ({"num_inference_steps": 13}, 422, "num_inference_steps"),
        ({"num_inference_steps": 0}, 422, "num_inference_steps"),
        ({"num_images": 5}, 422, "num_images"),
        ({"format": "gif"}, 422, "format"),
        ({"size": "big"}, 400, "size"),
        ({"width": 1024}, 400, "width"),
    ],
)
async def test_limits_are_enforced_in_the_openai_error_envelope(client, fleet, extra, status, param):
    response = await generate(client, fleet, {"prompt": "a red fox"} | extra)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert (await stats(client, fleet, "empiriolabs"))["generations"] == 0


async def test_unknown_model_is_model_not_found(client, fleet):
    response = await generate(client, fleet, {"model": "dall-e-3", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


async def test_x_api_key_header_is_accepted(client, fleet):
    response = await generate(client, fleet, {"prompt": "a red fox", "size": "256x256"}, headers={"x-api-key": fleet["empiriolabs"].key})
    assert response.status_code == 200


async def test_model_schema_endpoint_is_free(client, fleet):
    response = await client.get(fleet["empiriolabs"].base_url + "/v1/models/flux-2-klein-4b", headers=auth(fleet, "empiriolabs"))
    body = response.json()
    assert response.status_code == 200 and body["id"] == "flux-2-klein-4b" and body["parameters"]["max_pixels"] == 1_048_576
    counters = await stats(client, fleet, "empiriolabs")
    assert counters["generations"] == 0 and counters["free_calls"] == 1


async def test_job_failed_fault_is_a_502_upstream_error(client, fleet):
    await knobs(client, fleet, "empiriolabs", {"faults": {"queue": ["job_failed"]}})
    response = await generate(client, fleet, {"prompt": "a red fox"})
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
