"""The local GPU backend's API (local_backend/schemas.py), without a GPU.

    POST /v1/images/generations   GenerateRequest -> GenerateResponse (b64 images, per-image seeds)
    GET  /v1/info                 BackendInfo: queue depth, estimated wait, live cost figures
    GET  /health/live             200
    GET  /health/ready            200, or 503 while `local.ready` is false
    GET  /metrics                 a few Prometheus gauges and counters

A bounded gate stands in for the GPU: `local.max_concurrency` generations
run at once, `local.queue_capacity` more may wait, and one more is refused
with 429 + Retry-After at once (as the real batcher does). Each generation
holds its slot for job.queue_ms + job.run_ms. The live cost figure is
`gpu_usd_per_hour * seconds_per_image / 3600` per image (marginal), and that
divided by `utilisation` (amortized); both are knobs.

With `"stream": true` an admitted request is answered 200 `text/event-stream`
as the real service answers it (docs/local-backend.md#previews): a `preview`
event per partial image (`partial_images` per image, after the steps
`preview_steps` names, each a half-size render labelled "preview i/k"), then
`result` with the usual body, or `error` with the usual error body and its
status (504 past the deadline while queued, 500 `job_failed`). The events
come in one body once the job's time is up, not step by step.

No credentials unless a key is given at start (`Authorization: Bearer`).
Errors are `{"error": {message, type, code}}` as schemas.py says.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from pydantic import ValidationError

from local_backend.schemas import SSE_MEDIA_TYPE, GenerateRequest, preview_steps
from tests.emulators.asgi import Request, Response, dumps, hold, loads, route
from tests.emulators.core import EmulatorApp
from tests.emulators.jobs import Spec

MODEL = "black-forest-labs/FLUX.2-klein-4B (emulated)"
BUCKETS = ["512x512", "768x768", "1024x1024", "1024x768", "768x1024", "1024x576", "576x1024"]


class Gate:
    """At most `capacity()` holders at once, FIFO waiters, capacity read live."""

    def __init__(self) -> None:
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, capacity: int, timeout: float | None) -> bool:
        """True once a slot is held; False if `timeout` passed first."""
        if self.running < capacity and not self._waiters:
            self.running += 1
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(capacity)  # granted just as we were cancelled: pass it on
            raise
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def release(self, capacity: int) -> None:
        self.running -= 1
        while self._waiters and self.running < capacity:
            future = self._waiters.popleft()
            if not future.done():
                self.running += 1
                future.set_result(None)


class LocalEmulator(EmulatorApp):
    provider = "local"
    sync = True

    def __init__(self, key: str | None = None, knobs: Any = None, **kw: Any) -> None:
        super().__init__(key, knobs, **kw)
        self.gate = Gate()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.busy_s = 0.0
        self.started = time.monotonic()

    def build_routes(self) -> list:
        return [
            route("POST", "/v1/images/generations", "generate", self.generate, paid=True),
            route("GET", "/v1/info", "info", self.info),
            route("GET", "/health/live", "live", self.live, auth=False),
            route("GET", "/health/ready", "ready", self.ready, auth=False),
            route("GET", "/metrics", "metrics", self.metrics, auth=False),
        ]

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        kinds = {
            "missing_credentials": ("authentication_error", "missing_api_key"),
            "unauthorized": ("authentication_error", "invalid_api_key"),
            "rate_limited": ("rate_limit_error", "queue_full"),
            "timeout": ("timeout", "deadline_exceeded"),
            "not_found": ("invalid_request_error", "not_found"),
            "method_not_allowed": ("invalid_request_error", "method_not_allowed"),
            "out_of_credit": ("insufficient_quota", "insufficient_credits"),
        }
        kind, local_code = kinds.get(code, ("server_error", "internal_error"))
        if code == "rate_limited":
            message = "the queue is full"
        return _envelope(status, message, kind, local_code, headers)

    # ---- cost -------------------------------------------------------------------

    def marginal_usd_per_image(self) -> float:
        k = self.knobs.local
        return k.gpu_usd_per_hour * k.seconds_per_image / 3600

    def request_cost_usd(self, spec: Spec, images: int) -> float:
        """What the service reports for a request: its busy time, which grows with
        megapixels and steps from the 1024x1024, 4-step reference (as the real
        service measures it), times `billed_cost_factor`."""
        scale = (spec.width * spec.height) / (1024 * 1024) * spec.steps / 4
        return self.marginal_usd_per_image() * scale * images * self.knobs.billed_cost_factor

    def amortized_usd_per_image(self) -> float:
        return self.marginal_usd_per_image() / max(self.knobs.local.utilisation, 1e-6)

    # ---- handlers -------------------------------------------------------------

    async def generate(self, request: Request) -> Response | None:
        local = self.knobs.local
        if not local.ready:
            return _envelope(503, "the model is warming up", "server_error", "warming_up", {"retry-after": "5"})
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
            where = ".".join(str(p) for p in first.get("loc", ()))
            return _envelope(422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), "invalid_request_error", "invalid_request")
        if self.gate.running >= local.max_concurrency and self.gate.waiting >= local.queue_capacity:
            self.rejected["queue_full"] += 1
            wait = max(1, round(self.estimated_wait_s()))
            return _envelope(429, "the queue is full", "rate_limit_error", "queue_full", {"retry-after": str(wait)})
        queued = time.monotonic()
        stream = bool(req.stream)
        if not await self.gate.acquire(local.max_concurrency, req.timeout_s):
            self.rejected["deadline"] += 1
            return _streamed(stream, [], _envelope(504, "the deadline passed while queued", "timeout", "deadline_exceeded"))
        queue_ms = (time.monotonic() - queued) * 1000
        try:
            work = self.knobs.job
            run_s = (work.queue_ms + work.run_ms) / 1000
            if not await hold(request, run_s, self.release):
                return None
            self.busy_s += run_s
        finally:
            self.gate.release(self.knobs.local.max_concurrency)
        if request.fault == "job_failed":
            self.count_generation(0)
            failed = _envelope(500, "generation failed", "server_error", self.knobs.faults.job_error_code or "generation_failed")
            return _streamed(stream, [], failed)
        seed = req.seed if req.seed is not None else self.new_seed()
        spec = Spec(prompt=req.prompt, width=req.width, height=req.height, fmt=req.output_format, n=req.num_images, seed=seed, edit_refs=len(req.reference_images), steps=req.num_inference_steps)
        nsfw = self.nsfw_flags(spec.n) if req.enable_safety_checker else ()
        images = await self.render_all(spec, nsfw)
        self.count_generation(len(images))
        body = {
            "images": [
                {
                    "b64_json": im.b64(),
                    "width": im.width,
                    "height": im.height,
                    "seed": seed + i,
                    "content_type": im.content_type,
                    "nsfw": nsfw[i] if nsfw else None,
                }
                for i, im in enumerate(images)
            ],
            "seed": seed,
            "timings": {"queue_ms": round(queue_ms, 3), "inference_ms": round(run_s * 1000, 3), "batch_size": 1},
            "cost_usd_estimate": self.request_cost_usd(spec, len(images)),
        }
        previews = await self.previews(spec, req.partial_images or 0) if stream else []
        return _streamed(stream, previews, Response.json(200, body))

    async def previews(self, spec: Spec, partial_images: int) -> list[dict[str, Any]]:
        """The preview events' data: by step, then by image, as the real batcher sends them."""
        steps = preview_steps(spec.steps, partial_images)
        width, height = max(16, spec.width // 2), max(16, spec.height // 2)
        events = []
        for partial, step in enumerate(steps):
            for index in range(spec.n):
                label = f"preview {partial + 1}/{len(steps)}" + (f"  {index + 1}/{spec.n}" if spec.n > 1 else "")
                image = await asyncio.to_thread(self.images.render, width, height, spec.fmt, spec.prompt, label)
                events.append({"index": index, "partial_image_index": partial, "b64_json": image.b64(),
                               "content_type": image.content_type, "width": width, "height": height, "step": step})  # fmt: skip
        return events

    def estimated_wait_s(self) -> float:
        per_job = (self.knobs.job.queue_ms + self.knobs.job.run_ms) / 1000 or self.knobs.local.seconds_per_image
        return (self.gate.waiting + 1) * per_job / self.knobs.local.max_concurrency

    async def info(self, request: Request) -> Response:
        local = self.knobs.local
        body = {
            "model": MODEL,
            "device": "emulator",
            "ready": local.ready,
            "buckets": BUCKETS,
            "max_batch_images": 4,
            "seconds_per_image": {b: local.seconds_per_image for b in BUCKETS},
            "queue_depth": self.gate.waiting,
            "queue_capacity": local.queue_capacity,
            "estimated_wait_s": self.estimated_wait_s() if self.gate.running >= local.max_concurrency else 0.0,
            "cost": {
                "marginal_usd_per_image": self.marginal_usd_per_image(),
                "amortized_usd_per_image": self.amortized_usd_per_image(),
                "gpu_usd_per_hour": local.gpu_usd_per_hour,
                "basis": "1024x1024, 4 steps",
                "utilization": local.utilisation,
            },
        }
        return Response.json(200, body)

    async def live(self, request: Request) -> Response:
        return Response.json(200, {"status": "live"})

    async def ready(self, request: Request) -> Response:
        if self.knobs.local.ready:
            return Response.json(200, {"status": "ready"})
        return Response.json(503, {"status": "warming_up"})

    async def metrics(self, request: Request) -> Response:
        lines = [
            "# TYPE local_backend_ready gauge",
            f"local_backend_ready {1 if self.knobs.local.ready else 0}",
            "# TYPE local_backend_queue_depth gauge",
            f'local_backend_queue_depth{{unit="requests"}} {self.gate.waiting}',
            "# TYPE local_backend_images_total counter",
            f"local_backend_images_total {self.stats.images}",
            "# TYPE local_backend_rejected_total counter",
            *(f'local_backend_rejected_total{{reason="{r}"}} {c}' for r, c in sorted(self.rejected.items())),
            "# TYPE local_backend_gpu_busy_seconds_total counter",
            f"local_backend_gpu_busy_seconds_total {self.busy_s}",
            "# TYPE local_backend_cost_per_image_usd gauge",
            f'local_backend_cost_per_image_usd{{kind="marginal"}} {self.marginal_usd_per_image()}',
            f'local_backend_cost_per_image_usd{{kind="amortised"}} {self.amortized_usd_per_image()}',
        ]
        return Response(200, ("\n".join(lines) + "\n").encode(), b"text/plain; version=0.0.4; charset=utf-8")

    def reset(self, *, keep_knobs: bool = False) -> None:
        super().reset(keep_knobs=keep_knobs)
        self.rejected.clear()
        self.busy_s = 0.0


def _streamed(stream: bool, previews: list[dict[str, Any]], answer: Response) -> Response:
    """`answer` as the event stream of a `"stream": true` request, previews first."""
    if not stream:
        return answer
    events = [b"event: preview\ndata: " + dumps(data) + b"\n\n" for data in previews]
    if answer.status == 200:
        events.append(b"event: result\ndata: " + answer.body + b"\n\n")
    else:
        retry = answer.header("retry-after")
        error = {**loads(answer.body), "status": answer.status, **({"retry_after": float(retry)} if retry else {})}
        events.append(b"event: error\ndata: " + dumps(error) + b"\n\n")
    return Response(200, b"".join(events), SSE_MEDIA_TYPE.encode() + b"; charset=utf-8", {"cache-control": "no-cache"})


def _envelope(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"error": {"message": message, "type": kind, "code": code}}, headers)
