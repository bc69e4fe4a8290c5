"""The HTTP API with a fake generator, in-process (httpx.ASGITransport + the
app's lifespan; litestar's AsyncTestClient does not interleave concurrent
requests, docs/local-backend.md#http-and-metrics)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from PIL import Image

from local_backend.app import create_app
from local_backend.schemas import BackendInfo, GenerateResponse
from tests.local_backend.conftest import FakeGenerator, make_settings, seed_color, until

BODY = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2}


@asynccontextmanager
async def serve(generator: FakeGenerator | None = None, *, wait_ready: bool = True, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    factory: Callable[[], Any] | None = kw.pop("generator_factory", None)
    checker = kw.pop("checker", None)
    app = create_app(make_settings(**kw), generator, generator_factory=factory, checker=checker)
    async with app.lifespan():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://local") as client:
            if wait_ready:
                await until(lambda: app.state.service.batcher.ready)
            yield client
            if generator is not None and generator.gate is not None:
                generator.gate.set()


def png_b64(width: int = 64, height: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 128, 255)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _truncated_png_b64() -> str:
    """A 128x128 PNG of noise cut to half: a sound header, missing pixel data."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (128, 128), bytes((i * 7919) % 251 for i in range(128 * 128 * 3))).save(buffer, "PNG")
    data = buffer.getvalue()
    return base64.b64encode(data[: len(data) // 2]).decode()


TRUNCATED_PNG_B64 = _truncated_png_b64()


async def test_not_ready_until_warm_up_finished() -> None:
    loaded = threading.Event()
    fake = FakeGenerator()

    def slow_load() -> FakeGenerator:
        loaded.wait(timeout=10)
        return fake

    async with serve(generator_factory=slow_load, wait_ready=False) as client:
        assert (await client.get("/health/live")).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json()["error"]["code"] == "not_ready"
        refused = await client.post("/v1/images/generations", json=BODY)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert BackendInfo.model_validate((await client.get("/v1/info")).json()).ready is False
        loaded.set()
        await until(lambda: fake.calls != [])  # warm-up reached the generator
        for _ in range(200):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/health/ready")).status_code == 200
        warm_up_sizes = {(call.width, call.height) for call in fake.calls}
        assert warm_up_sizes == {(64, 64)}
        assert (await client.post("/v1/images/generations", json=BODY)).status_code == 200


async def test_a_failed_start_up_stays_not_ready_and_says_why() -> None:
    def broken() -> FakeGenerator:
        raise FileNotFoundError("model folder not found: /nowhere")

    async with serve(generator_factory=broken, wait_ready=False) as client:
        for _ in range(200):
            body = (await client.get("/health/ready")).json()
            if "start-up failed" in body["error"]["message"]:
                break
            await asyncio.sleep(0.01)
        assert "model folder not found" in body["error"]["message"]


async def test_generation_returns_images_per_image_seeds_and_timings(fake: FakeGenerator) -> None:
    async with serve(fake, gpu_usd_per_hour=2.5) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "seed": 7, "num_images": 3})
    assert response.status_code == 200
    body = GenerateResponse.model_validate(response.json())
    assert body.seed == 7 and [image.seed for image in body.images] == [7, 8, 9]
    for image in body.images:
        assert (image.width, image.height, image.content_type, image.nsfw) == (64, 64, "image/png", None)
        with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as decoded:
            assert decoded.convert("RGB").getpixel((0, 0)) == seed_color(image.seed)
    assert body.timings.batch_size == 3 and body.timings.inference_ms > 0
    assert body.cost_usd_estimate is not None and body.cost_usd_estimate > 0


async def test_a_seed_is_chosen_and_returned_when_none_is_given(fake: FakeGenerator) -> None:
    async with serve(fake) as client:
        body = (await client.post("/v1/images/generations", json={**BODY, "num_images": 2})).json()
    assert body["images"][1]["seed"] == body["images"][0]["seed"] + 1 == body["seed"] + 1


@pytest.mark.parametrize(("fmt", "content_type", "pil_format"), [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
async def test_output_formats(fake: FakeGenerator, fmt: str, content_type: str, pil_format: str) -> None:
    async with serve(fake) as client:
        image = (await client.post("/v1/images/generations", json={**BODY, "output_format": fmt})).json()["images"][0]
    assert image["content_type"] == content_type
    with Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))) as decoded:
        assert decoded.format == pil_format


@pytest.mark.parametrize(
    ("patch", "status", "code", "words"),
    [
        ({"width": 100}, 422, "invalid_request", "width"),
        ({"num_images": 5}, 422, "invalid_request", "num_images"),
        ({"prompt": ""}, 422, "invalid_request", "prompt"),
        ({"width": 2048, "height": 2048}, 422, "unsupported_request", "pixels"),
        ({"num_inference_steps": 9}, 422, "unsupported_request", "num_inference_steps"),
        ({"reference_images": ["%%%"]}, 422, "invalid_reference_image", "reference_images[0]"),
        ({"reference_images": [TRUNCATED_PNG_B64]}, 422, "invalid_reference_image", "could not be decoded"),
    ],
)
async def test_requests_this_service_cannot_do_get_422(fake: FakeGenerator, patch: dict, status: int, code: str, words: str) -> None:
    async with serve(fake, max_pixels=1024 * 1024, max_steps=8) as client:
        response = await client.post("/v1/images/generations", json={**BODY, **patch})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and words in error["message"]
    assert fake.calls == [] or all(call.prompts == ["warm-up"] for call in fake.calls)


async def test_a_truncated_reference_is_the_callers_422_not_a_pipeline_500(fake: FakeGenerator) -> None:
    """Its header reads fine; only decoding the pixels finds the damage, before it is queued."""
    async with serve(fake) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "reference_images": [TRUNCATED_PNG_B64]})
        info = BackendInfo.model_validate((await client.get("/v1/info")).json())
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_reference_image"
    assert all(call.prompts == ["warm-up"] for call in fake.calls)
    assert info.ready


async def test_unreadable_json_is_400(fake: FakeGenerator) -> None:
    async with serve(fake) as client:
        response = await client.post("/v1/images/generations", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


async def test_reference_images_reach_the_generator(fake: FakeGenerator) -> None:
    async with serve(fake) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "reference_images": [png_b64(96, 64)]})
    assert response.status_code == 200
    (call,) = [c for c in fake.calls if c.prompts != ["warm-up"]]
    assert [ref.size for ref in call.references] == [(96, 64)]


async def test_burst_over_the_queue_gets_429_with_retry_after(fake: FakeGenerator) -> None:
    gate = fake.block()
    async with serve(fake, max_queue=2, batch_delay_ms=0, warmup=False) as client:
        first = asyncio.create_task(client.post("/v1/images/generations", json=BODY))
        await until(fake.entered.is_set)
        burst = [asyncio.create_task(client.post("/v1/images/generations", json={**BODY, "prompt": f"p{n}"})) for n in range(5)]
        await until(lambda: sum(task.done() for task in burst) >= 3)
        gate.set()
        responses = [await first, *(await asyncio.gather(*burst))]
        metrics = (await client.get("/metrics")).text
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 429, 429, 429]
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in refused)
    assert 'local_backend_rejected_total{reason="queue_full"} 3.0' in metrics


async def test_deadline_passed_in_queue_is_504(fake: FakeGenerator) -> None:
    gate = fake.block()
    async with serve(fake, batch_delay_ms=0, warmup=False) as client:
        first = asyncio.create_task(client.post("/v1/images/generations", json=BODY))
        await until(fake.entered.is_set)
        late = await client.post("/v1/images/generations", json={**BODY, "timeout_s": 0.05})
        gate.set()
        assert (await first).status_code == 200
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"


async def test_concurrent_requests_are_batched(fake: FakeGenerator) -> None:
    async with serve(fake, batch_delay_ms=100, warmup=False) as client:
        responses = await asyncio.gather(*(client.post("/v1/images/generations", json={**BODY, "prompt": f"p{n}", "seed": n}) for n in range(6)))
    assert all(r.status_code == 200 for r in responses)
    assert len(fake.calls) < 6
    assert [r.json()["seed"] for r in responses] == list(range(6))


async def test_info_reports_device_buckets_speed_queue_and_cost(fake: FakeGenerator) -> None:
    async with serve(fake, gpu_usd_per_hour=2.5, max_queue=9) as client:
        await client.post("/v1/images/generations", json=BODY)
        info = BackendInfo.model_validate((await client.get("/v1/info")).json())
    assert info.ready and info.device == "fake" and info.model == "tiny-random-flux2-klein"
    assert info.buckets == ["64x64", "128x128"]
    assert info.max_batch_images == 8 and info.queue_capacity == 9 and info.queue_depth == 0
    assert info.seconds_per_image["64x64"] > 0  # measured by warm-up and the request
    assert info.estimated_wait_s == 0.0
    assert info.cost.gpu_usd_per_hour == 2.5 and info.cost.basis == "1024x1024, 4 steps"
    assert info.cost.marginal_usd_per_image is not None and info.cost.marginal_usd_per_image > 0
    assert info.cost.utilization is not None


async def test_metrics_are_prometheus_text_from_the_apps_own_registry(fake: FakeGenerator) -> None:
    async with serve(fake) as one, serve(FakeGenerator()) as two:
        await one.post("/v1/images/generations", json=BODY)
        first, second = (await one.get("/metrics")), (await two.get("/metrics"))
    assert first.headers["content-type"].startswith("text/plain")
    for name in ("local_backend_ready 1.0", 'local_backend_images_total{bucket="64x64"} 1.0', "local_backend_forwards_total 1.0",
                 'local_backend_queue_depth{unit="requests"} 0.0', 'local_backend_cost_per_image_usd{kind="marginal"}',
                 "local_backend_gpu_busy_seconds_total"):  # fmt: skip
        assert name in first.text
    assert "local_backend_forwards_total 0.0" in second.text  # separate registries


class FlagEverything:
    name = "flag-all"

    def check(self, images: list[Image.Image]) -> list[bool | None]:
        return [True] * len(images)


@pytest.mark.parametrize(("enabled", "nsfw", "color"), [(True, True, (0, 0, 0)), (False, None, seed_color(3))])
async def test_safety_checker_is_a_post_filter(fake: FakeGenerator, enabled: bool, nsfw: bool | None, color: tuple) -> None:
    async with serve(fake, checker=FlagEverything()) as client:
        body = (await client.post("/v1/images/generations", json={**BODY, "seed": 3, "enable_safety_checker": enabled})).json()
    image = body["images"][0]
    assert image["nsfw"] is nsfw
    with Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))) as decoded:
        assert decoded.convert("RGB").getpixel((0, 0)) == color


@pytest.mark.parametrize(("method", "path", "status", "code"), [("GET", "/nowhere", 404, "not_found"), ("GET", "/v1/images/generations", 405, "method_not_allowed")])
async def test_framework_refusals_use_the_error_envelope(fake: FakeGenerator, method: str, path: str, status: int, code: str) -> None:
    async with serve(fake) as client:
        response = await client.request(method, path)
    assert response.status_code == status and response.json()["error"]["code"] == code


async def test_a_body_over_the_limit_is_413_in_the_envelope(fake: FakeGenerator) -> None:
    async with serve(fake, max_body_bytes=1024) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "prompt": "x" * 2000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
