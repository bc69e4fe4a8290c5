"""The HTTP service (litestar): the wire API of `local_backend.schemas`.

`create_app(settings, generator=...)` builds one app around one batcher. With
no generator given, the pipeline is loaded from the settings in the worker
thread after start-up, so `/health/live` answers while weights load and
`/health/ready` stays 503 until warm-up finished (docs/local-backend.md#warm-up-and-readiness).

Status codes: 400 unreadable JSON, 422 a request this service cannot do (code
`invalid_reference_image` when a reference cannot be decoded), 429
queue full (Retry-After), 503 not ready or out of memory, 504 deadline passed
before the batch started, 500 the pipeline failed. Errors are
`{"error": {"message", "type", "code"}}`.

With `"stream": true` a request that is queued is answered 200
`text/event-stream` at once: one `event: preview` per partial image as the
denoising loop reaches its step, then `event: result` holding exactly the JSON
the non-streaming answer would (`to_response`), or `event: error` holding that
answer's error body with its status (docs/local-backend.md#previews). Refusals
before queueing (400, 422, 429, 503) are the plain JSON answers above.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream
from pydantic import ValidationError

from local_backend.batcher import (
    Batcher,
    DeadlineExpired,
    GenerationFailed,
    ItemResult,
    NotReady,
    OutOfMemory,
    Preview,
    QueueFull,
    WorkItem,
    image_seeds,
    random_seed,
)
from local_backend.buckets import reference_digest, size_label, size_problem
from local_backend.config import Settings
from local_backend.cost import cost_figures
from local_backend.images import BadReference, read_reference
from local_backend.metrics import CONTENT_TYPE, BackendMetrics
from local_backend.pipeline import Generator, build_generator
from local_backend.safety import SafetyChecker, build_checker
from local_backend.schemas import (
    INVALID_REFERENCE_CODE,
    SSE_MEDIA_TYPE,
    BackendInfo,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    LocalImage,
    PreviewEvent,
    StreamError,
    Timings,
    describe_validation_error,
)

log = logging.getLogger(__name__)

NOT_READY_RETRY_AFTER_S = 5
JSON = "application/json"


def error_kind(status: int) -> str:
    return {400: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")


def retry_after_seconds(retry_after: float) -> int:
    return max(1, math.ceil(retry_after))


def error_response(status: int, message: str, code: str, *, retry_after: float | None = None) -> Response[Any]:
    headers = {} if retry_after is None else {"retry-after": str(retry_after_seconds(retry_after))}
    return Response(
        {"error": {"message": message, "type": error_kind(status), "code": code}},
        status_code=status,
        headers=headers,
        media_type=JSON,
    )


def generation_error(exc: BaseException) -> tuple[int, str, str, float | None] | None:
    """(status, message, code, retry_after) for an error a queued request's
    future ends with; None for one that is not the batcher's."""
    if isinstance(exc, DeadlineExpired):
        return 504, str(exc), "deadline_exceeded", None
    if isinstance(exc, OutOfMemory):
        return 503, str(exc), "out_of_memory", None
    if isinstance(exc, GenerationFailed):
        return 500, str(exc), "generation_failed", None
    if isinstance(exc, NotReady):
        return 503, str(exc), "not_ready", NOT_READY_RETRY_AFTER_S
    return None


def sse(event: str, data: str) -> bytes:
    """One server-sent event; `data` is one line of JSON."""
    return f"event: {event}\ndata: {data}\n\n".encode()


def preview_event(preview: Preview) -> PreviewEvent:
    return PreviewEvent(
        index=preview.index,
        partial_image_index=preview.partial_image_index,
        b64_json=base64.b64encode(preview.data).decode(),
        content_type=preview.content_type,
        width=preview.width,
        height=preview.height,
        step=preview.step,
    )


async def event_stream(future: asyncio.Future[ItemResult], previews: asyncio.Queue[Preview | None]) -> AsyncIterator[bytes]:
    """The events of one streaming request. Previews arrive from the worker
    thread through `loop.call_soon_threadsafe`, all before the batch's result
    is set on `future` (the executor's completion is scheduled after them), and
    the `None` that `future`'s done callback queues ends them. A caller who
    leaves cancels the future, which drops the request if it is still queued."""
    future.add_done_callback(lambda _: previews.put_nowait(None))
    try:
        while (preview := await previews.get()) is not None:
            yield sse("preview", preview_event(preview).model_dump_json())
        exc = future.exception()
        if exc is None:
            yield sse("result", to_response(future.result()).model_dump_json())
            return
        known = generation_error(exc)
        if known is None:
            log.error("a streaming request failed: %s", type(exc).__name__)
            known = (500, f"the request failed: {type(exc).__name__}", "generation_failed", None)
        status, message, code, retry_after = known
        body = StreamError(
            error=ErrorBody(message=message, type=error_kind(status), code=code),
            status=status,
            retry_after=None if retry_after is None else retry_after_seconds(retry_after),
        )
        yield sse("error", body.model_dump_json(exclude_none=True))
    finally:
        if not future.done():
            future.cancel()


def http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own refusals (404, 405, 413 body too large) in this service's envelope."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, exc.detail, code)


class Service:
    """What the handlers share: settings, the batcher, metrics, and bring-up."""

    def __init__(
        self,
        settings: Settings,
        *,
        generator: Generator | None = None,
        generator_factory: Callable[[], Generator] | None = None,
        checker: SafetyChecker | None = None,
        oom_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.settings = settings
        self.metrics = BackendMetrics()
        self.batcher = Batcher(settings, self.metrics, oom_errors=oom_errors)
        self.generator = generator
        self._factory = generator_factory
        self._checker = checker
        self._bring_up_task: asyncio.Task[None] | None = None

    @property
    def device(self) -> str:
        return self.generator.device if self.generator is not None else self.settings.device

    async def start(self) -> None:
        self.batcher.start()
        self._bring_up_task = asyncio.get_running_loop().create_task(self._bring_up(), name="klein-bring-up")

    async def stop(self) -> None:
        if self._bring_up_task is not None and not self._bring_up_task.done():
            self._bring_up_task.cancel()
        await self.batcher.stop()

    async def _bring_up(self) -> None:
        try:
            if self.generator is None:
                factory = self._factory or (lambda: build_generator(self.settings))
                self.generator = await self.batcher.in_worker(factory)
            checker = self._checker or await self.batcher.in_worker(build_checker, self.settings)
            self.batcher.attach(self.generator, checker)
            if self.settings.warmup:
                started = time.monotonic()
                await self.batcher.warm_up(self.settings.warmup_plan, self.settings.warmup_steps)
                log.info("warm-up took %.1fs", time.monotonic() - started)
            self.batcher.mark_ready()
            log.info("ready on %s", self.device)
        except Exception as exc:
            self.batcher.problem = f"start-up failed: {type(exc).__name__}: {exc}"[:300]
            log.exception("start-up failed")

    def info(self) -> BackendInfo:
        batcher = self.batcher
        cost = cost_figures(self.settings.gpu_usd_per_hour, batcher.speed, batcher.utilization.utilization())
        return BackendInfo(
            model=self.settings.model_name,
            device=self.device,
            ready=batcher.ready,
            buckets=[size_label(w, h) for w, h in self.settings.buckets],
            max_batch_images=self.settings.max_batch_images,
            seconds_per_image=batcher.speed.by_size(),
            queue_depth=batcher.queue_depth(),
            queue_capacity=self.settings.max_queue,
            estimated_wait_s=round(batcher.estimated_wait(), 4),
            cost=cost,
        )

    def work_item(self, req: GenerateRequest) -> WorkItem:
        """The queued form of a valid request; raises ValueError naming what this service cannot do."""
        problem = size_problem(req.width, req.height, self.settings.limits)
        if problem:
            raise ValueError(problem)
        if req.num_inference_steps > self.settings.max_steps:
            raise ValueError(f"num_inference_steps must be 1 to {self.settings.max_steps}")
        references = tuple(read_reference(i, text) for i, text in enumerate(req.reference_images))
        seed = random_seed() if req.seed is None else req.seed
        timeout = req.timeout_s or self.settings.request_timeout_s
        return WorkItem(
            prompt=req.prompt,
            seeds=image_seeds(seed, req.num_images),
            width=req.width,
            height=req.height,
            steps=req.num_inference_steps,
            deadline=time.monotonic() + timeout,
            references=references,
            reference_digest=reference_digest([ref.data for ref in references]),
            output_format=req.output_format,
            output_compression=req.output_compression,
            safety=req.enable_safety_checker,
            partial_images=(req.partial_images or 0) if req.stream else 0,
        )


def to_response(result: ItemResult) -> GenerateResponse:
    return GenerateResponse(
        images=[
            LocalImage(
                b64_json=base64.b64encode(image.data).decode(),
                width=image.width,
                height=image.height,
                seed=image.seed,
                content_type=image.content_type,
                nsfw=image.nsfw,
            )
            for image in result.images
        ],
        seed=result.images[0].seed,
        timings=Timings(
            queue_ms=round(result.queue_s * 1000, 3),
            inference_ms=round(result.inference_s * 1000, 3),
            batch_size=result.batch_images,
        ),
        cost_usd_estimate=result.cost_usd,
    )


def create_app(
    settings: Settings,
    generator: Generator | None = None,
    *,
    generator_factory: Callable[[], Generator] | None = None,
    checker: SafetyChecker | None = None,
    oom_errors: tuple[type[BaseException], ...] = (),
) -> Litestar:
    """The service as an ASGI app. `generator` (or `generator_factory`, run in
    the worker thread) replaces loading from settings; `oom_errors` adds
    exception types treated as out-of-memory besides torch.cuda.OutOfMemoryError."""
    service = Service(settings, generator=generator, generator_factory=generator_factory, checker=checker, oom_errors=oom_errors)
    metrics = service.metrics

    @post("/v1/images/generations", status_code=200)
    async def generations(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            body = await request.json()
        except Exception as exc:
            if isinstance(exc, HTTPException) and exc.status_code == 413:
                raise  # body too large: the framework's answer, in the envelope
            metrics.rejected.labels(reason="invalid").inc()
            return error_response(400, "the body is not valid JSON", "invalid_json")
        try:
            req = GenerateRequest.model_validate(body)
            # Decoding references can take a second: in a worker thread, off the event loop.
            item = await asyncio.to_thread(service.work_item, req) if req.reference_images else service.work_item(req)
        except ValidationError as exc:
            metrics.rejected.labels(reason="invalid").inc()
            return error_response(422, describe_validation_error(exc), "invalid_request")
        except BadReference as exc:
            metrics.rejected.labels(reason="invalid").inc()
            return error_response(422, str(exc), INVALID_REFERENCE_CODE)
        except ValueError as exc:  # what this service cannot do
            metrics.rejected.labels(reason="invalid").inc()
            return error_response(422, str(exc), "unsupported_request")
        previews: asyncio.Queue[Preview | None] = asyncio.Queue()
        if req.stream and item.partial_images:
            loop = asyncio.get_running_loop()

            def hand_over(preview: Preview) -> None:  # in the worker thread
                loop.call_soon_threadsafe(previews.put_nowait, preview)

            item.on_preview = hand_over
        try:
            future = service.batcher.submit(item)
        except NotReady as exc:
            return error_response(503, str(exc), "not_ready", retry_after=NOT_READY_RETRY_AFTER_S)
        except QueueFull as exc:
            return error_response(429, "the queue is full", "queue_full", retry_after=exc.retry_after)
        if req.stream:
            return Stream(event_stream(future, previews), media_type=SSE_MEDIA_TYPE, headers={"cache-control": "no-cache"})
        try:
            result = await future
        except (DeadlineExpired, OutOfMemory, GenerationFailed, NotReady) as exc:
            status, message, code, retry_after = generation_error(exc) or (500, str(exc), "generation_failed", None)
            return error_response(status, message, code, retry_after=retry_after)
        return Response(to_response(result).model_dump_json().encode(), media_type=JSON)

    @get("/v1/info")
    async def info() -> Response[Any]:
        return Response(service.info().model_dump_json().encode(), media_type=JSON)

    @get("/health/live")
    async def live() -> Response[Any]:
        return Response({"status": "ok"}, media_type=JSON)

    @get("/health/ready")
    async def ready() -> Response[Any]:
        if service.batcher.ready:
            return Response({"status": "ready"}, media_type=JSON)
        message = service.batcher.problem or "the model is still loading or warming up"
        return error_response(503, message, "not_ready", retry_after=NOT_READY_RETRY_AFTER_S)

    @get("/metrics")
    async def metrics_endpoint() -> Response[Any]:
        metrics.estimated_wait.set(service.batcher.estimated_wait())
        metrics.set_cost(service.info().cost)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app = Litestar(
        route_handlers=[generations, info, live, ready, metrics_endpoint],
        exception_handlers={HTTPException: http_exception},
        on_startup=[service.start],
        on_shutdown=[service.stop],
        request_max_body_size=settings.max_body_bytes,
    )
    app.state.service = service
    return app
