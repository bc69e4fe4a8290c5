"""The local emulator's streaming protocol (docs/local-backend.md#previews),
and the gateway's local adapter with a preview_sink against it: previews
without torch."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest

from gateway.domain.job import ImageJob, JobKind
from gateway.providers.base import AdapterSettings, FailureClass, PreviewImage, PreviewSink, ProviderError, Timeouts, preview_sink
from gateway.providers.local import LocalAdapter
from local_backend.schemas import GenerateResponse, PreviewEvent, StreamError
from tests.emulators.support import decode, knobs

GENERATE = "/v1/images/generations"
FAST = Timeouts(connect=1.0, request=5.0, poll_interval=0.01, max_poll_interval=0.05)


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def generate(client: httpx.AsyncClient, fleet: Any, body: dict[str, Any]) -> httpx.Response:
    return await client.post(fleet["local"].base_url + GENERATE, json={"prompt": "a red fox", "width": 512, "height": 256, **body})


async def test_a_preview_event_per_partial_image_then_the_result(client, fleet) -> None:
    response = await generate(client, fleet, {"stream": True, "partial_images": 2, "num_images": 2, "seed": 40, "num_inference_steps": 4})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [name for name, _ in events] == ["preview"] * 4 + ["result"]
    previews = [PreviewEvent.model_validate(data) for _, data in events[:-1]]
    assert [(p.step, p.index, p.partial_image_index) for p in previews] == [(1, 0, 0), (1, 1, 0), (3, 0, 1), (3, 1, 1)]
    assert all((p.width, p.height) == (256, 128) and decode(base64.b64decode(p.b64_json)).size == (256, 128) for p in previews)
    result = GenerateResponse.model_validate(events[-1][1])
    assert [image.seed for image in result.images] == [40, 41]


async def test_without_stream_nothing_changes(client, fleet) -> None:
    response = await generate(client, fleet, {"partial_images": 2})
    assert response.headers["content-type"].startswith("application/json")
    assert GenerateResponse.model_validate(response.json()).images


async def test_errors_after_admission_are_error_events(client, fleet) -> None:
    await knobs(client, fleet, "local", {"job": {"run_ms": 300}, "local": {"max_concurrency": 1}})
    first = asyncio.create_task(generate(client, fleet, {}))
    await asyncio.sleep(0.05)
    late = await generate(client, fleet, {"stream": True, "partial_images": 1, "timeout_s": 0.05})
    await first
    ((name, data),) = parse_sse(late.text)
    error = StreamError.model_validate(data)
    assert (late.status_code, name, error.status, error.error.code) == (200, "error", 504, "deadline_exceeded")


def adapter(fleet: Any, client: httpx.AsyncClient) -> LocalAdapter:
    emulator = fleet["local"]
    return LocalAdapter(AdapterSettings(name="local", base_url=emulator.base_url, credential=emulator.key or None, timeouts=FAST), client)


async def run_with_sink(local: LocalAdapter, job: ImageJob, partial_images: int, deadline_s: float = 10) -> tuple[Any, list[PreviewImage]]:
    got: list[PreviewImage] = []
    token = preview_sink.set(PreviewSink(partial_images, got.append))
    try:
        return await local.generate(job, time.monotonic() + deadline_s), got
    finally:
        preview_sink.reset(token)


async def test_the_adapter_hands_the_emulators_previews_to_its_sink(client, fleet) -> None:
    job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=512, height=512, n=2, steps=4, seed=7, output_format="jpeg")
    result, got = await run_with_sink(adapter(fleet, client), job, 3)
    assert [(p.index, p.partial_image_index) for p in got] == [(i, k) for k in range(3) for i in range(2)]
    assert all(p.content_type == "image/jpeg" and p.data[:2] == b"\xff\xd8" and (p.width, p.height) == (256, 256) for p in got)
    assert [image.seed for image in result.images] == [7, 8]
    assert all(base64.b64decode(image.b64 or "")[:2] == b"\xff\xd8" for image in result.images)


async def test_the_adapter_classifies_an_emulated_error_event_as_the_plain_answer(client, fleet) -> None:
    await knobs(client, fleet, "local", {"job": {"run_ms": 300}, "local": {"max_concurrency": 1}})
    local = adapter(fleet, client)
    job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=512, height=512)
    busy = asyncio.create_task(local.generate(job, time.monotonic() + 10))
    await asyncio.sleep(0.05)
    with pytest.raises(ProviderError) as streamed:
        await run_with_sink(local, job, 1, deadline_s=0.2)  # queued past its deadline: 504 as an event
    await busy
    busy = asyncio.create_task(local.generate(job, time.monotonic() + 10))
    await asyncio.sleep(0.05)
    with pytest.raises(ProviderError) as plain:
        await local.generate(job, time.monotonic() + 0.2)
    await busy
    assert (streamed.value.failure, streamed.value.status, streamed.value.billed) == (FailureClass.FAILED, 504, False)
    assert (streamed.value.failure, streamed.value.status, streamed.value.message) == (plain.value.failure, plain.value.status, plain.value.message)
