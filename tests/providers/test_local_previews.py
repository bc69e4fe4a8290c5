"""The local adapter's previews (`preview_sink`) against respx: the
server-sent events of docs/local-backend.md#previews on the wire, every error
answered as an event classified as the plain answer is, and no change at all
without a sink."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.providers.base import FailureClass, PreviewImage, PreviewSink, ProviderError, preview_sink
from gateway.providers.local import LocalAdapter

from .conftest import PNG_BYTES
from .test_local import GEN, error, generated, image, sent_json

JPEG_BYTES = b"\xff\xd8\xff\xe0preview"
SSE = {"content-type": "text/event-stream; charset=utf-8"}


@pytest.fixture
def adapter(make_settings, http_client) -> LocalAdapter:
    return LocalAdapter(make_settings("local", "http://127.0.0.1:8090/", None), http_client)


def event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def preview(index: int, partial: int, step: int, data: bytes = JPEG_BYTES) -> dict[str, Any]:
    return {"index": index, "partial_image_index": partial, "b64_json": base64.b64encode(data).decode(),
            "content_type": "image/jpeg", "width": 512, "height": 512, "step": step}  # fmt: skip


def sse_response(*events: bytes) -> httpx.Response:
    return httpx.Response(200, headers=SSE, content=b"".join(events))


async def with_sink(call: Callable[[], Awaitable[Any]], partial_images: int = 2, send: Any = None) -> tuple[Any, list[PreviewImage]]:
    got: list[PreviewImage] = []
    token = preview_sink.set(PreviewSink(partial_images, send or got.append))
    try:
        return await call(), got
    finally:
        preview_sink.reset(token)


async def test_without_a_sink_the_request_is_the_plain_one_byte_for_byte(mock, adapter, make_job, deadline) -> None:
    """test_local.py pins the plain body's exact fields; a sink set and reset
    elsewhere changes none of its bytes (only timeout_s, which counts down)."""
    route = mock.post(GEN).respond(200, json=generated(image(11)))
    await adapter.generate(make_job(seed=11), deadline)
    await with_sink(lambda: asyncio.sleep(0))
    assert preview_sink.get() is None
    await adapter.generate(make_job(seed=11), deadline)
    plain, again = (call.request for call in route.calls)
    assert "stream" not in json.loads(plain.content) and "partial_images" not in json.loads(plain.content)
    assert plain.content.split(b',"timeout_s"')[0] == again.content.split(b',"timeout_s"')[0]
    assert plain.headers["content-type"] == again.headers["content-type"] == "application/json"


async def test_a_sink_gets_each_preview_before_the_usual_result(mock, adapter, make_job, deadline) -> None:
    route = mock.post(GEN).mock(
        return_value=sse_response(
            event("preview", preview(0, 0, 1)),
            b": a comment line, ignored\n\n",
            event("preview", preview(1, 0, 1, b"\xff\xd8other")),
            event("preview", preview(0, 1, 3)),
            event("result", generated(image(11), image(12))),
        )
    )
    result, got = await with_sink(lambda: adapter.generate(make_job(n=2, seed=11), deadline))
    body = sent_json(route)
    assert (body["stream"], body["partial_images"]) == (True, 2)
    assert [(p.data, p.index, p.partial_image_index, p.content_type, p.width) for p in got] == [
        (JPEG_BYTES, 0, 0, "image/jpeg", 512),
        (b"\xff\xd8other", 1, 0, "image/jpeg", 512),
        (JPEG_BYTES, 0, 1, "image/jpeg", 512),
    ]
    assert [(base64.b64decode(i.b64), i.seed) for i in result.images] == [(PNG_BYTES, 11), (PNG_BYTES, 12)]
    assert result.seed == 11 and result.raw == {"timings": generated(image(11))["timings"]}


async def test_an_async_sink_is_awaited_and_a_failing_one_fails_nothing(mock, adapter, make_job, deadline) -> None:
    events = (event("preview", preview(0, 0, 1)), event("preview", preview(0, 1, 3)), event("result", generated(image(3))))
    mock.post(GEN).mock(side_effect=lambda request: sse_response(*events))
    got: list[int] = []

    async def slow(p: PreviewImage) -> None:
        await asyncio.sleep(0.01)
        got.append(p.partial_image_index)

    def broken(p: PreviewImage) -> None:
        raise RuntimeError("the caller's stream is gone")

    await with_sink(lambda: adapter.generate(make_job(), deadline), send=slow)
    result, _ = await with_sink(lambda: adapter.generate(make_job(), deadline), send=broken)
    assert got == [0, 1] and result.seed == 3


async def test_partial_images_are_capped_at_three_and_zero_means_no_stream(mock, adapter, make_job, deadline) -> None:
    route = mock.post(GEN).mock(side_effect=lambda request: sse_response(event("result", generated(image(1)))))
    await with_sink(lambda: adapter.generate(make_job(), deadline), partial_images=7)
    assert sent_json(route)["partial_images"] == 3
    route.mock(side_effect=None, return_value=httpx.Response(200, json=generated(image(1))))
    await with_sink(lambda: adapter.generate(make_job(), deadline), partial_images=0)
    assert "stream" not in json.loads(route.calls[1].request.content)


async def test_a_service_that_answers_json_anyway_is_read_as_before(mock, adapter, make_job, deadline) -> None:
    mock.post(GEN).respond(200, json=generated(image(5)))
    result, got = await with_sink(lambda: adapter.generate(make_job(), deadline))
    assert result.seed == 5 and got == []


def as_event(response: httpx.Response) -> bytes:
    body = response.json()
    retry = response.headers.get("retry-after")
    data = {**body, "status": response.status_code, **({"retry_after": float(retry)} if retry else {})}
    return event("error", data)


ERRORS = [
    error(503, "not_ready", "the service is shutting down", {"retry-after": "5"}),
    error(503, "out_of_memory", "one 2048x2048 image does not fit"),
    error(504, "deadline_exceeded", "the deadline passed"),
    error(500, "generation_failed", "the pipeline failed"),
    error(500, "invalid_reference_image", "reference_images[0] could not be decoded"),
]


@pytest.mark.parametrize("answer", ERRORS, ids=lambda r: f"{r.status_code}-{r.json()['error']['code']}")
async def test_an_error_event_is_classified_as_the_plain_answer(mock, adapter, make_job, deadline, answer: httpx.Response) -> None:
    route = mock.post(GEN).mock(return_value=answer)
    with pytest.raises(ProviderError) as plain:
        await adapter.generate(make_job(), deadline)
    route.mock(return_value=sse_response(event("preview", preview(0, 0, 1)), as_event(answer)))
    with pytest.raises(ProviderError) as streamed:
        await with_sink(lambda: adapter.generate(make_job(), deadline))
    fields = ("failure", "message", "status", "retry_after", "billed", "code", "credentials_invalid")
    assert [getattr(streamed.value, f) for f in fields] == [getattr(plain.value, f) for f in fields]


@pytest.mark.parametrize(
    ("answer", "failure", "retry_after"),
    [
        (error(429, "queue_full", "the queue is full", {"retry-after": "3"}), FailureClass.REFUSED, 3.0),
        (error(422, "invalid_request", "partial_images: at most 3"), FailureClass.REJECTED, None),
        (httpx.Response(502, text="<html>bad gateway</html>"), FailureClass.FAILED, None),
    ],
)
async def test_a_refusal_before_the_stream_is_the_plain_answer(mock, adapter, make_job, deadline, answer, failure, retry_after) -> None:
    mock.post(GEN).mock(return_value=answer)
    with pytest.raises(ProviderError) as raised:
        await with_sink(lambda: adapter.generate(make_job(), deadline))
    assert (raised.value.failure, raised.value.retry_after, raised.value.billed) == (failure, retry_after, False)


@pytest.mark.parametrize(
    "events",
    [
        (event("preview", preview(0, 0, 1)),),  # ends without a result
        (event("result", {"images": "no"}),),
        (event("error", {"error": "not an envelope"}),),
    ],
    ids=["no-result", "bad-result", "bad-error"],
)
async def test_a_stream_without_a_usable_ending_is_failed_and_possibly_billed(mock, adapter, make_job, deadline, events) -> None:
    mock.post(GEN).mock(return_value=sse_response(*events))
    with pytest.raises(ProviderError) as raised:
        await with_sink(lambda: adapter.generate(make_job(), deadline))
    assert (raised.value.failure, raised.value.status, raised.value.billed) == (FailureClass.FAILED, 200, True)


async def test_an_unreadable_preview_is_skipped(mock, adapter, make_job, deadline) -> None:
    broken = {**preview(0, 0, 1), "b64_json": "not base64!"}
    mock.post(GEN).mock(return_value=sse_response(event("preview", broken), event("preview", {"index": 0}), event("result", generated(image(2)))))
    result, got = await with_sink(lambda: adapter.generate(make_job(), deadline))
    assert got == [] and result.seed == 2


def stalled_then(raise_after: BaseException | None) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        yield event("preview", preview(0, 0, 1))
        if raise_after is not None:
            raise raise_after
        await asyncio.sleep(30)
        yield event("result", generated(image(1)))

    return body()


async def test_a_stream_past_the_read_timeout_is_an_unknown_outcome(mock, adapter, make_job) -> None:
    mock.post(GEN).mock(side_effect=lambda request: httpx.Response(200, headers=SSE, content=stalled_then(None)))
    started = time.monotonic()
    with pytest.raises(ProviderError) as raised:
        await with_sink(lambda: adapter.generate(make_job(), time.monotonic() + 0.3))
    assert (raised.value.failure, raised.value.billed) == (FailureClass.UNKNOWN_OUTCOME, True)
    assert time.monotonic() - started < 2  # the whole stream within the read timeout, not each read


async def test_a_connection_broken_mid_stream_is_failed_as_a_broken_plain_read(mock, adapter, make_job, deadline) -> None:
    mock.post(GEN).mock(side_effect=lambda request: httpx.Response(200, headers=SSE, content=stalled_then(httpx.ReadError("reset"))))
    with pytest.raises(ProviderError) as raised:
        await with_sink(lambda: adapter.generate(make_job(), deadline))
    assert (raised.value.failure, raised.value.billed, raised.value.message) == (FailureClass.FAILED, False, "connection broke: ReadError")


async def test_connect_errors_keep_their_class_with_a_sink(mock, adapter, make_job, deadline) -> None:
    mock.post(GEN).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ProviderError) as raised:
        await with_sink(lambda: adapter.generate(make_job(), deadline))
    assert raised.value.failure is FailureClass.UNREACHABLE
