"""Wire schema of the local backend's HTTP API.

Shared by the service (`local_backend.app`), the gateway's local adapter
(`gateway.providers.local`) and the local emulator, so the three cannot drift.
Pure pydantic: importing it never pulls in torch.

    POST /v1/images/generations   GenerateRequest -> GenerateResponse
                                  429 + Retry-After when the queue is full,
                                  503 while warming up, 504 past the deadline,
                                  422 invalid_reference_image for a reference
                                  that cannot be decoded (the input's fault),
                                  errors as {"error": {"message", "type", "code"}}
                                  With "stream": true, a 200 answer is
                                  text/event-stream: `preview` events
                                  (PreviewEvent, "partial_images" of them per
                                  image), then one `result` (GenerateResponse)
                                  or `error` (StreamError) event; refusals
                                  before the request is queued stay plain JSON
    GET  /v1/info                 BackendInfo (queue, measured speed, live cost)
    GET  /health/live             200 while the process runs
    GET  /health/ready            200 once warm-up finished, else 503
    GET  /metrics                 Prometheus text
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

OutputFormat = Literal["png", "jpeg", "webp"]

# The error code for a reference image the service cannot decode: the caller's
# input, so the gateway classifies it as rejected and never as a sick backend.
INVALID_REFERENCE_CODE = "invalid_reference_image"


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    width: int = Field(ge=64, le=2048, multiple_of=16)
    height: int = Field(ge=64, le=2048, multiple_of=16)
    num_inference_steps: int = Field(default=4, ge=1, le=50)
    guidance_scale: float = 1.0  # accepted and ignored: the distilled model runs without CFG
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    enable_safety_checker: bool = False
    reference_images: list[str] = Field(default_factory=list, max_length=4)  # base64 (or data: URIs)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)
    # None when unset, so a request without them goes on the wire as before.
    stream: bool | None = None  # answer text/event-stream (see the module docstring)
    partial_images: int | None = Field(default=None, ge=0, le=3)  # previews per image; only with stream


class LocalImage(BaseModel):
    b64_json: str
    width: int
    height: int
    seed: int
    content_type: str
    nsfw: bool | None = None  # None: not checked


class Timings(BaseModel):
    queue_ms: float
    inference_ms: float
    batch_size: int


class GenerateResponse(BaseModel):
    images: list[LocalImage]
    seed: int
    timings: Timings
    cost_usd_estimate: float | None = None


class PreviewEvent(BaseModel):
    """The data of one `event: preview`: image `index` of the request, after `step` of its steps."""

    index: int
    partial_image_index: int
    b64_json: str
    content_type: str
    width: int
    height: int
    step: int


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str


class StreamError(BaseModel):
    """The data of an `event: error`: the error the non-streaming answer would
    have been, with its HTTP status and Retry-After (seconds) beside it."""

    error: ErrorBody
    status: int
    retry_after: float | None = None


SSE_MEDIA_TYPE = "text/event-stream"
MAX_PARTIAL_IMAGES = 3


def preview_steps(steps: int, partial_images: int) -> tuple[int, ...]:
    """After how many completed denoising steps a request asking for
    `partial_images` previews gets one: round((i + 1) * steps / (k + 1)) for
    i < k, rounding halves up, kept within 1..steps and without repeats. With
    more steps than previews that is exactly k evenly spaced steps, all before
    the last; with fewer, one preview per step at most (OpenAI, too, may send
    fewer partial images than asked)."""
    k = max(0, min(partial_images, MAX_PARTIAL_IMAGES))
    chosen = (min(steps, max(1, math.floor((i + 1) * steps / (k + 1) + 0.5))) for i in range(k))
    return tuple(sorted(set(chosen)))


class CostFigures(BaseModel):
    marginal_usd_per_image: float | None = None  # busy GPU time only
    amortized_usd_per_image: float | None = None  # wall time at measured utilisation
    gpu_usd_per_hour: float = 0.0
    basis: str | None = None  # the image the per-image figures are for, e.g. "1024x1024, 4 steps"
    utilization: float | None = None  # busy / wall time over the recent window, 0..1


class BackendInfo(BaseModel):
    model: str
    device: str
    ready: bool
    buckets: list[str]  # "WxH"
    max_batch_images: int
    seconds_per_image: dict[str, float] = Field(default_factory=dict)  # by bucket, at 4 steps
    queue_depth: int = 0
    queue_capacity: int = 0
    estimated_wait_s: float = 0.0
    cost: CostFigures = Field(default_factory=CostFigures)


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a failed validation as 'field: message', for error envelopes."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    where = ".".join(str(part) for part in errors[0].get("loc", ()))
    message = errors[0].get("msg", "invalid value")
    return f"{where}: {message}" if where else message
