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
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from pydantic import ValidationError

from local_backend.batcher import (
    Batcher,
    DeadlineExpired,
    GenerationFailed,
    ItemResult,
    NotReady,
    OutOfMemory,
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
    BackendInfo,
    GenerateRequest,
    GenerateResponse,
    LocalImage,
    Timings,
    describe_validation_error,
)

log = logging.getLogger(__name__)

NOT_READY_RETRY_AFTER_S = 5
JSON = "application/json"


def error_response(status: int, message: str, code: str, *, retry_after: float | None = None) -> Response[Any]:
    kind = {400: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    headers = {} if retry_after is None else {"retry-after": str(max(1, math.ceil(retry_after)))}
    return Response(
        {"error": {"message": message, "type": kind, "code": code}},
        status_code=status,
        headers=headers,
        media_type=JSON,
    )


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
        try:
            future = service.batcher.submit(item)
        except NotReady as exc:
            return error_response(503, str(exc), "not_ready", retry_after=NOT_READY_RETRY_AFTER_S)
        except QueueFull as exc:
            return error_response(429, "the queue is full", "queue_full", retry_after=exc.retry_after)
        try:
            result = await future
        except DeadlineExpired as exc:
            return error_response(504, str(exc), "deadline_exceeded")
        except OutOfMemory as exc:
            return error_response(503, str(exc), "out_of_memory")
        except GenerationFailed as exc:
            return error_response(500, str(exc), "generation_failed")
        except NotReady as exc:
            return error_response(503, str(exc), "not_ready", retry_after=NOT_READY_RETRY_AFTER_S)
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
