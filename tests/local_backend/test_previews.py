"""Previews (docs/local-backend.md#previews): the step rule, and the tiny
pipeline behind the app streaming partial images of batched requests, each
request getting only its own."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from local_backend.app import event_stream
from local_backend.batcher import Batcher, Preview
from local_backend.pipeline import BatchCall
from local_backend.schemas import GenerateResponse, PreviewEvent, StreamError, preview_steps
from tests.local_backend.conftest import FakeGenerator, FakeOOM, make_item, make_settings, seed_color, until
from tests.local_backend.test_app import serve

BODY = {"width": 64, "height": 64, "num_inference_steps": 4}


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[list[PreviewEvent], GenerateResponse]:
    response = await client.post("/v1/images/generations", json={**BODY, **body, "stream": True}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [name for name, _ in events[:-1]] == ["preview"] * (len(events) - 1) and events[-1][0] == "result"
    return [PreviewEvent.model_validate(data) for _, data in events[:-1]], GenerateResponse.model_validate(events[-1][1])


def pixels(b64: str) -> list[int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return list(image.convert("RGB").tobytes())


def close(a: list[int], b: list[int], tolerance: int = 2) -> bool:
    """Equal up to fp32 CPU noise between a batched and a single call, in 8-bit output."""
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tolerance


def test_previews_fall_on_evenly_spaced_steps() -> None:
    assert preview_steps(4, 0) == ()
    assert preview_steps(4, 1) == (2,)
    assert preview_steps(4, 2) == (1, 3)
    assert preview_steps(4, 3) == (1, 2, 3)
    assert preview_steps(8, 3) == (2, 4, 6)
    assert preview_steps(50, 3) == (13, 25, 38)
    # Fewer steps than asked: one preview per step at most, never past the last step.
    assert preview_steps(2, 3) == (1, 2)
    assert preview_steps(1, 3) == (1,)
    # More steps than previews: exactly k, all before the last step.
    for k in range(4):
        for steps in range(k + 1, 51):
            chosen = preview_steps(steps, k)
            assert len(chosen) == k and all(1 <= s < steps for s in chosen), (steps, k)


def test_a_call_without_previews_takes_no_callback() -> None:
    assert not BatchCall(["a"], [1], 64, 64, 4).wants_previews
    assert not BatchCall(["a"], [1], 64, 64, 4, previews=[()], on_preview=lambda *_: None).wants_previews
    with pytest.raises(ValueError, match="one list of steps per image"):
        BatchCall(["a", "b"], [1, 2], 64, 64, 4, previews=[(1,)])


# ---- the tiny pipeline -----------------------------------------------------------


@pytest.fixture
def tiny() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")


async def test_batched_requests_each_get_only_their_own_previews(tiny: None) -> None:
    a = {"prompt": "a red fox", "seed": 3, "partial_images": 2}
    b = {"prompt": "a grey cat", "seed": 9, "partial_images": 1}
    c = {"prompt": "a blue bird", "seed": 5, "partial_images": 0}
    async with serve(batch_delay_ms=300) as client:
        (a_previews, a_result), (b_previews, b_result), (c_previews, c_result) = await asyncio.gather(stream(client, a), stream(client, b), stream(client, c))
        assert a_result.timings.batch_size == b_result.timings.batch_size == c_result.timings.batch_size == 3
        # Each request alone, streaming and not: what its own latents give.
        a_alone, a_alone_result = await stream(client, a)
        b_alone, b_alone_result = await stream(client, b)
        plain = [await client.post("/v1/images/generations", json={**BODY, **body}) for body in (a, b, c)]
        metrics = (await client.get("/metrics")).text

    # By count and step: 2 for A after steps 1 and 3 of 4, 1 for B after step 2, none for C.
    assert [(p.index, p.partial_image_index, p.step) for p in a_previews] == [(0, 0, 1), (0, 1, 3)]
    assert [(p.index, p.partial_image_index, p.step) for p in b_previews] == [(0, 0, 2)]
    assert c_previews == []
    assert all((p.width, p.height, p.content_type) == (32, 32, "image/png") for p in a_previews + b_previews)
    # By content: each request's previews are its own rows of the batch's latents,
    # equal to those it gets alone, and A's are not B's.
    for batched, alone in ((a_previews, a_alone), (b_previews, b_alone)):
        assert [p.step for p in batched] == [p.step for p in alone]
        assert all(close(pixels(x.b64_json), pixels(y.b64_json)) for x, y in zip(batched, alone, strict=True))
    assert not close(pixels(a_previews[0].b64_json), pixels(b_previews[0].b64_json), tolerance=10)
    # The final images are what a non-streaming request with the same seed gives.
    assert [r.status_code for r in plain] == [200, 200, 200]
    for streamed, response in zip((a_result, b_result, c_result, a_alone_result, b_alone_result), plain + plain[:2], strict=True):
        expected = GenerateResponse.model_validate(response.json())
        assert [i.seed for i in streamed.images] == [i.seed for i in expected.images]
        assert all(close(pixels(x.b64_json), pixels(y.b64_json)) for x, y in zip(streamed.images, expected.images, strict=True))
    assert "local_backend_previews_total 6.0" in metrics


async def test_a_preview_is_not_the_final_image(tiny: None) -> None:
    async with serve() as client:
        previews, result = await stream(client, {"prompt": "a red fox", "seed": 3, "partial_images": 3, "num_images": 2})
    assert [(p.index, p.step) for p in previews] == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    assert [p.partial_image_index for p in previews if p.index == 1] == [0, 1, 2]
    finals = []
    for image in result.images:
        with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as full:
            finals.append(list(full.convert("RGB").resize((32, 32), Image.Resampling.BOX).tobytes()))
    first = pixels(previews[0].b64_json)
    assert sum(abs(x - y) for x, y in zip(first, finals[0], strict=True)) / len(first) > 5  # mid-loop latents, not the final ones
    assert not close(pixels(previews[0].b64_json), pixels(previews[1].b64_json), tolerance=10)  # image 0 is not image 1


async def test_previews_follow_the_requested_format(tiny: None) -> None:
    async with serve() as client:
        previews, result = await stream(client, {"prompt": "a red fox", "seed": 3, "partial_images": 1, "output_format": "jpeg"})
    assert previews[0].content_type == "image/jpeg" and base64.b64decode(previews[0].b64_json)[:2] == b"\xff\xd8"
    assert result.images[0].content_type == "image/jpeg"


# ---- the protocol, with a fake generator ------------------------------------------


async def test_stream_without_partial_images_is_just_the_result(fake: FakeGenerator) -> None:
    async with serve(fake) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "prompt": "a fox", "seed": 4, "stream": True})
    events = parse_sse(response.text)
    assert [name for name, _ in events] == ["result"]
    assert GenerateResponse.model_validate(events[0][1]).seed == 4
    assert response.headers["cache-control"] == "no-cache"


async def test_partial_images_without_stream_is_the_plain_answer(fake: FakeGenerator) -> None:
    async with serve(fake) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "prompt": "a fox", "partial_images": 2})
    assert response.headers["content-type"].startswith("application/json")
    assert GenerateResponse.model_validate(response.json()).images


async def test_refusals_before_queueing_stay_plain_json(fake: FakeGenerator) -> None:
    async with serve(fake) as client:
        response = await client.post("/v1/images/generations", json={**BODY, "prompt": "a fox", "stream": True, "partial_images": 4})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


async def test_a_queued_request_past_its_deadline_ends_with_an_error_event() -> None:
    fake = FakeGenerator()
    async with serve(fake, batch_delay_ms=0) as client:
        gate = fake.block()
        fake.entered.clear()
        running = asyncio.ensure_future(client.post("/v1/images/generations", json={**BODY, "prompt": "busy"}))
        await until(fake.entered.is_set)
        started = time.monotonic()
        response = await client.post("/v1/images/generations", json={**BODY, "prompt": "late", "stream": True, "partial_images": 1, "timeout_s": 0.05})
        gate.set()
        assert (await running).status_code == 200
    events = parse_sse(response.text)
    assert [name for name, _ in events] == ["error"] and time.monotonic() - started < 5
    error = StreamError.model_validate(events[0][1])
    assert (error.status, error.error.code, error.error.type) == (504, "deadline_exceeded", "server_error")


async def test_a_caller_who_leaves_the_stream_cancels_its_request() -> None:
    """Closing the stream cancels the request's future, which the batcher takes
    as the caller gone (a queued request is dropped, test_batcher.py)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    previews: asyncio.Queue[Any] = asyncio.Queue()
    previews.put_nowait(Preview(index=0, partial_image_index=0, step=1, data=b"png", content_type="image/png", width=32, height=32))
    events = event_stream(future, previews)
    first = await anext(events)
    assert first.startswith(b"event: preview\ndata: {") and first.endswith(b"}\n\n")
    await events.aclose()
    assert future.cancelled()


class PreviewingFake(FakeGenerator):
    """Sends every preview a call asks for, coloured by the image's seed, before
    it may run out of memory: what a real call that fails mid-loop does."""

    def generate(self, call: BatchCall) -> list[Image.Image]:
        for position, steps in enumerate(call.previews):
            for step in steps:
                assert call.on_preview is not None
                call.on_preview(position, step, Image.new("RGB", (8, 8), seed_color(call.seeds[position])))
        return super().generate(call)


async def test_previews_go_to_their_own_request_and_survive_an_out_of_memory_split() -> None:
    fake = PreviewingFake(oom_above=1, oom_times=1)
    batcher = Batcher(make_settings(batch_delay_ms=50), oom_errors=(FakeOOM,))
    batcher.attach(fake)
    batcher.start()
    batcher.mark_ready()
    got: dict[str, list[Preview]] = {"a": [], "b": [], "c": []}
    try:
        items = [
            make_item("a", seeds=(1, 2), steps=4, partial_images=2, on_preview=got["a"].append),
            make_item("b", seeds=(7,), steps=4, partial_images=1, on_preview=got["b"].append),
            make_item("c", seeds=(9,), steps=4, partial_images=0, on_preview=got["c"].append),
        ]
        await asyncio.gather(*(batcher.submit(item) for item in items))
    finally:
        await batcher.stop()
    assert fake.sizes[0] == 4 and len(fake.sizes) > 2  # one call, out of memory, then split
    # Sent once per step even though the first call previewed every image before failing.
    assert sorted((p.index, p.partial_image_index, p.step) for p in got["a"]) == [(0, 0, 1), (0, 1, 3), (1, 0, 1), (1, 1, 3)]
    assert [(p.index, p.partial_image_index, p.step) for p in got["b"]] == [(0, 0, 2)]
    assert got["c"] == []
    for name, seeds in (("a", (1, 2)), ("b", (7,))):
        for preview in got[name]:
            with Image.open(io.BytesIO(preview.data)) as image:
                assert image.convert("RGB").getpixel((0, 0)) == seed_color(seeds[preview.index])
    assert batcher.metrics.previews._value.get() == 5


def test_a_failing_preview_never_fails_the_generation(tiny: None) -> None:
    from local_backend.pipeline import PipelineGenerator, tiny_pipeline

    generator = PipelineGenerator(tiny_pipeline(), "cpu")
    plain = generator.generate(BatchCall(["a fox"], [3], 64, 64, 4))

    def broken(position: int, step: int, image: Image.Image) -> None:
        raise RuntimeError("the event loop is closed")

    (image,) = generator.generate(BatchCall(["a fox"], [3], 64, 64, 4, previews=[(1, 2, 3)], on_preview=broken))
    assert image.tobytes() == plain[0].tobytes()  # the callback changes no latent


def test_edits_and_non_square_sizes_get_half_size_previews(tiny: None) -> None:
    """With references the model input holds the reference tokens too; the
    callback's latents are the generated image's alone."""
    from local_backend.pipeline import PipelineGenerator, tiny_pipeline

    generator = PipelineGenerator(tiny_pipeline(), "cpu")
    got: list[tuple[int, int, tuple[int, int]]] = []
    reference = Image.new("RGB", (64, 64), (200, 10, 10))
    call = BatchCall(["a fox", "a cat"], [1, 2], 64, 48, 4, references=[reference], previews=[(1, 2), (3,)],
                     on_preview=lambda n, step, image: got.append((n, step, image.size)))  # fmt: skip
    images = generator.generate(call)
    assert got == [(0, 1, (32, 24)), (0, 2, (32, 24)), (1, 3, (32, 24))]
    assert [image.size for image in images] == [(64, 48), (64, 48)]
