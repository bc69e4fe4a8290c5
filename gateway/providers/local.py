"""The local GPU backend (`klein-local serve`), spoken through local_backend.schemas.

Protocol: one synchronous `POST {base}/v1/images/generations` with a
`GenerateRequest` body answers with a `GenerateResponse`: base64 images, a seed
per image, NSFW flags, timings and the request's share of GPU cost
(`cost_usd_estimate`, reported as `reported_cost_usd`). References travel as
base64 in the body: with `accepts_url_refs=False` the gateway fetches a
caller's URL reference before this adapter runs, and one that still has no
bytes is rejected here. No credential:
the service binds 127.0.0.1 by default and is addressed by `KLEIN_LOCAL_URL`.

Failures (local_backend/app.py):

| answer                   | class       | why                                                    |
|--------------------------|-------------|--------------------------------------------------------|
| 429 queue full           | REFUSED     | with Retry-After; the gateway fails over at once and   |
|                          |             | does not count it against health                       |
| 503 warming up / no room | REFUSED     | nothing ran                                            |
| 504 deadline passed      | FAILED      | dropped before its batch started: not billed           |
| 400 / 413 / 422          | REJECTED    | the input; another backend may take it                 |
| invalid_reference_image  | REJECTED    | a reference it cannot decode, at any status            |
| 500 / garbage body       | FAILED      |                                                        |
| connect error            | UNREACHABLE |                                                        |
| every image flagged      | CONTENT_FILTERED                                               |

The service gets this side's read timeout (the job's remaining time, at most
`timeouts.request`) as `timeout_s`, less a margin, so a request still queued
comes back as a clean 504 before the read timeout would make it an unknown
outcome. A batch that already started runs to its end.

Previews: with a `preview_sink` (gateway/providers/base.py) set around
`generate`, the request also asks `"stream": true, "partial_images": k` and
the service answers server-sent events (docs/local-backend.md#previews): each
`preview` goes to the sink as a `PreviewImage`, then the `result` event is
read exactly as the non-streaming body, and an `error` event exactly as the
error answer with that status (so every class in the table holds). A read
timeout, measured over the whole stream as the non-streaming read is, is
UNKNOWN_OUTCOME; a stream that ends without a result is FAILED. A service
that answers JSON anyway is read as before. Without a sink the request is the
non-streaming one, byte for byte.

`probe()` is free: `GET /health/ready`, then `GET /v1/info`, whose queue wait
and live cost figures go into `ProbeResult.live` for routing and pricing
(`estimated_wait_s`, `marginal_usd_per_image`, `amortized_usd_per_image`, per
1024x1024 image at 4 steps, see local_backend/cost.py).

Capabilities: those the service accepts by default (local_backend/config.py):
sides 64 to 2048 in multiples of 16, at most 4 MP, steps 1 to 50, 1 to 4
images, up to 4 references as bytes, png/jpeg/webp, seeds. A service started
with narrower limits (`--max-pixels`, `--max-steps`) needs the same in
providers.yaml `capabilities:`; it answers 422 otherwise, which is REJECTED.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any, ClassVar

import httpx
from pydantic import ValidationError

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import ImageJob
from gateway.net.wire import WireResponse
from gateway.providers import register
from gateway.providers._json import response_json
from gateway.providers._wire import http_error, provider_text
from gateway.providers.base import (
    Adapter,
    EmulatorHook,
    FailureClass,
    GeneratedImage,
    PreviewImage,
    PreviewSink,
    ProbeResult,
    ProviderError,
    ProviderResult,
    deadline_error,
    preview_sink,
    send_preview,
    stream_read_error,
)
from local_backend.schemas import (
    INVALID_REFERENCE_CODE,
    MAX_PARTIAL_IMAGES,
    SSE_MEDIA_TYPE,
    BackendInfo,
    GenerateRequest,
    GenerateResponse,
    PreviewEvent,
    StreamError,
    describe_validation_error,
)

# The model's own limits, which the service accepts by default (see the docstring);
# references must arrive as bytes, so the gateway fetches URL references first.
DEFAULT_CAPABILITIES = Capabilities(accepts_url_refs=False)
PROBE_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 3600.0  # GenerateRequest.timeout_s upper bound
DEADLINE_MARGIN_S = 1.0  # at most; never more than a tenth of the time left
# A GPU at a few dollars an hour makes an image for a fraction of a cent; a
# figure above this per image is a broken cost model, not a price.
MAX_PLAUSIBLE_USD_PER_IMAGE = Decimal(1)

log = logging.getLogger(__name__)


def service_timeout(remaining: float) -> float:
    """The deadline the service gets: a little before ours."""
    return min(MAX_TIMEOUT_S, remaining - min(DEADLINE_MARGIN_S, remaining / 10))


def request_body(job: ImageJob, timeout_s: float, partial_images: int = 0) -> dict[str, Any]:
    """The wire body for `job`; REJECTED when a reference has no bytes.
    `partial_images` > 0 asks for a stream with that many previews per image."""
    references = []
    for ref in job.references:
        if ref.data is None:
            raise ProviderError(FailureClass.REJECTED, "needs reference images as uploads or data URIs, not URLs")
        references.append(base64.b64encode(ref.data).decode())
    try:
        request = GenerateRequest(
            prompt=job.prompt,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=1.0 if job.guidance_scale is None else job.guidance_scale,
            seed=job.seed,
            num_images=job.n,
            output_format=job.output_format,
            output_compression=job.output_compression,
            enable_safety_checker=job.enable_safety_checker,
            reference_images=references,
            timeout_s=timeout_s,
            stream=True if partial_images > 0 else None,
            partial_images=partial_images if partial_images > 0 else None,
        )
    except ValidationError as exc:
        raise ProviderError(FailureClass.REJECTED, f"the local backend cannot take {describe_validation_error(exc)}") from None
    return request.model_dump(mode="json", exclude_none=True)


def error_text(response: WireResponse) -> tuple[str | None, str]:
    """(code, message) from the service's `{"error": {...}}` envelope, fit for a caller (`provider_text`)."""
    try:
        error = response_json(response).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else response.reason_phrase or "error"
    return (code and provider_text(code, None, 64)), provider_text(message, None)


def error_from(response: WireResponse) -> ProviderError:
    """The classified error of a non-2xx answer (or of a stream's `error` event, as one)."""
    code, message = error_text(response)
    # Not `submitted`: the service answers an error only for work that
    # never started (its 504 is a request dropped before its batch), so
    # no status hides a made, billed image.
    err = http_error(response, f"{code}: {message}" if code else message, submitted=False, code=code)
    if code == INVALID_REFERENCE_CODE:
        err.failure = FailureClass.REJECTED  # the caller's image, whatever the status: no health penalty
    return err


def result_from(status: int, content: bytes | str) -> ProviderResult:
    """The result of a 2xx body (or of a stream's `result` event)."""
    try:
        payload = GenerateResponse.model_validate_json(content)
    except ValidationError:
        raise ProviderError(
            FailureClass.FAILED, f"HTTP {status}: the response is not a GenerateResponse",
            status=status, billed=True,
        ) from None  # fmt: skip
    return to_result(payload)


def stream_error_response(data: str) -> WireResponse:
    """A stream's `error` event as the error answer it stands for."""
    try:
        event = StreamError.model_validate_json(data)
    except ValidationError:
        raise ProviderError(FailureClass.FAILED, "HTTP 200: an error event that is not a StreamError", status=200, billed=True) from None
    headers = {} if event.retry_after is None else {"retry-after": str(math.ceil(event.retry_after))}
    return httpx.Response(event.status, headers=headers, json={"error": event.error.model_dump()})


def preview_image(data: str) -> PreviewImage | None:
    """A `preview` event as a PreviewImage; None (skipped, logged) when unreadable."""
    try:
        event = PreviewEvent.model_validate_json(data)
        raw = base64.b64decode(event.b64_json, validate=True)
    except (ValidationError, binascii.Error, ValueError):
        log.warning("local backend sent an unreadable preview event; skipped")
        return None
    return PreviewImage(raw, event.index, event.partial_image_index, event.content_type, event.width, event.height)


async def sse_events(response: WireResponse) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each server-sent event in a streamed body."""
    event = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def to_result(payload: GenerateResponse) -> ProviderResult:
    images = []
    for item in payload.images:
        images.append(
            GeneratedImage(
                b64=item.b64_json,
                content_type=item.content_type,
                width=item.width,
                height=item.height,
                nsfw=item.nsfw,
                seed=item.seed,
            )
        )
    if not images:
        raise ProviderError(FailureClass.FAILED, "the response holds no image", billed=True)
    if all(image.nsfw is True for image in images):
        raise ProviderError(FailureClass.CONTENT_FILTERED, "every image was flagged by the safety checker", billed=True)
    return ProviderResult(
        images=images,
        seed=payload.seed,
        reported_cost_usd=plausible_cost(payload.cost_usd_estimate, len(images)),
        raw={"timings": payload.timings.model_dump()},
    )


def plausible_cost(figure: float | None, images: int) -> Decimal | None:
    """The service's cost figure as Decimal, or None (bill by the price sheet)
    when it is missing, not a finite number, negative or absurd. The images are
    made by then: a bad figure must never fail a paid success."""
    if figure is None:
        return None
    if isinstance(figure, bool) or not isinstance(figure, (int, float)) or not math.isfinite(figure) or figure < 0:
        log.warning("local backend reported an unusable cost figure (%r); billing by the price sheet", figure)
        return None
    cost = Decimal(str(figure))
    if cost > MAX_PLAUSIBLE_USD_PER_IMAGE * max(images, 1):
        log.warning("local backend reported an implausible cost (%s USD for %d images); billing by the price sheet", cost, images)
        return None
    return cost


# The service states its cost per 1024x1024 image; the gateway's gpu_time sheet
# prices per image at 1 MP and scales by the job's megapixels. Restating the
# live figure at 1 MP makes a 1024x1024 quote equal the service's own figure.
SERVICE_REFERENCE_MP = 1024 * 1024 / 1_000_000


def _per_mp(value: float | None) -> float | None:
    return None if value is None else value / SERVICE_REFERENCE_MP


def live_figures(info: BackendInfo) -> dict[str, Any]:
    return {
        "estimated_wait_s": info.estimated_wait_s,
        "marginal_usd_per_image": _per_mp(info.cost.marginal_usd_per_image),
        "amortized_usd_per_image": _per_mp(info.cost.amortized_usd_per_image),
        "queue_depth": info.queue_depth,
        "queue_capacity": info.queue_capacity,
    }


@register
class LocalAdapter(Adapter):
    kind: ClassVar[str] = "local"
    # No credential and no default address: the service is reached at KLEIN_LOCAL_URL.
    base_url_env: ClassVar[str] = "KLEIN_LOCAL_URL"
    default_capabilities: ClassVar[Capabilities] = DEFAULT_CAPABILITIES
    reports_queue_wait: ClassVar[bool] = True  # /v1/info: estimated_wait_s
    reports_live_price: ClassVar[bool] = True  # /v1/info: marginal and amortized USD per image
    takes_reference_bytes: ClassVar[bool] = True
    sends_previews: ClassVar[bool] = True  # preview_sink: streamed partial images
    emulator: ClassVar[EmulatorHook | None] = EmulatorHook("tests.emulators.local:LocalEmulator")

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_error(None)
        # The read timeout below is min(timeouts.request, remaining); the service drops
        # the request (504, nothing billed) a little before it.
        body = request_body(job, service_timeout(min(remaining, self.settings.timeouts.request)))
        sink = preview_sink.get()
        partial_images = 0 if sink is None else max(0, min(sink.partial_images, MAX_PARTIAL_IMAGES))
        read_s = min(remaining, self.settings.timeouts.request)
        body = request_body(job, service_timeout(read_s), partial_images)
        url = f"{self.base}/v1/images/generations"
        if sink is None or partial_images == 0:
            response = await self.request("POST", url, deadline=deadline, json=body)
            if not response.is_success:
                raise error_from(response)
            return result_from(response.status_code, response.content)
        started = time.monotonic()
        response = await self.request("POST", url, deadline=deadline, json=body, stream=True)
        try:
            # The whole stream within the read timeout the non-streaming read gets.
            async with asyncio.timeout(max(0.0, read_s - (time.monotonic() - started))):
                return await self._read_stream(response, sink)
        except (httpx.TransportError, TimeoutError) as exc:
            raise stream_read_error(exc) from None
        finally:
            await response.aclose()

    async def _read_stream(self, response: WireResponse, sink: PreviewSink) -> ProviderResult:
        if not response.is_success:
            await response.aread()
            raise error_from(response)
        if not response.headers.get("content-type", "").startswith(SSE_MEDIA_TYPE):
            return result_from(response.status_code, await response.aread())  # a service without streaming
        async for event, data in sse_events(response):
            if event == "preview":
                preview = preview_image(data)
                if preview is not None:
                    await send_preview(sink, preview)
            elif event == "result":
                return result_from(response.status_code, data)
            elif event == "error":
                raise error_from(stream_error_response(data))
        raise ProviderError(FailureClass.FAILED, "HTTP 200: the event stream ended without a result", status=200, billed=True)

    async def probe(self) -> ProbeResult:
        """Ready, then the live figures; never a generation."""
        started = time.monotonic()
        deadline = started + PROBE_TIMEOUT_S
        try:
            ready = await self.request("GET", f"{self.base}/health/ready", deadline=deadline)
            if not ready.is_success:
                _, message = error_text(ready)
                return ProbeResult(False, f"not ready: HTTP {ready.status_code}: {message}"[:300], time.monotonic() - started)
            response = await self.request("GET", f"{self.base}/v1/info", deadline=deadline)
        except ProviderError as exc:
            return ProbeResult(False, exc.message, time.monotonic() - started)
        latency = time.monotonic() - started
        if not response.is_success:
            return ProbeResult(False, f"/v1/info: HTTP {response.status_code}", latency)
        try:
            info = BackendInfo.model_validate_json(response.content)
        except ValidationError:
            return ProbeResult(False, "/v1/info is not a BackendInfo", latency)
        return ProbeResult(info.ready, f"ready on {provider_text(info.device, None, 80)}" if info.ready else "not ready", latency, live_figures(info))
