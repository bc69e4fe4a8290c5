"""Turn an OpenAI-shaped body (JSON or multipart fields) into an ImageJob.

The only place that knows the wire field names. Every model-wide limit is
checked here, before any backend is called, with an error naming the limit.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from gateway.domain.capabilities import MODEL_MAX_N, MODEL_MAX_PIXELS, MODEL_MAX_REFERENCES, MODEL_MAX_SIDE, MODEL_MAX_STEPS, MODEL_MIN_SIDE, MODEL_MULTIPLE
from gateway.domain.errors import InvalidRequest, NotFound
from gateway.domain.job import ImageJob, JobKind, ProviderPrefs, ReferenceImage
from gateway.domain.models import MAX_MODEL_CHARS, echo, resolve_model
from gateway.domain.sizes import resolve_size, size_intent

_DIGITS = re.compile(r"[0-9]{1,6}")  # a form's n as text; longer runs are refused unread
MAX_SEED = 2**32 - 1  # the narrowest documented seed range among backends (uint32)


class ProviderPrefsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order: list[str] = Field(default_factory=list, max_length=16)
    only: list[str] = Field(default_factory=list, max_length=16)
    ignore: list[str] = Field(default_factory=list, max_length=16)
    max_price: Decimal | None = Field(default=None, ge=0)
    allow_fallbacks: bool = True


class ImageBody(BaseModel):
    """The fields of /v1/images/generations and /v1/images/edits.

    Unknown fields are ignored (the OpenAI SDK and other clients send extras),
    but every known field is type-checked."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    n: int = Field(default=1, ge=1, le=MODEL_MAX_N)
    size: str | None = None
    aspect_ratio: str | None = None
    image_size: str | dict[str, Any] | None = None
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "jpg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    quality: str | None = None  # accepted; the distilled model has one quality
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=3)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(default=None, ge=1, le=MODEL_MAX_STEPS)
    steps: int | None = Field(default=None, ge=1, le=MODEL_MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=20)
    enable_safety_checker: bool = True
    negative_prompt: str | None = None  # accepted and ignored: the distilled model has no CFG
    provider: ProviderPrefsBody | None = None
    images: list[Any] | None = None  # JSON edit form: URLs or data URIs

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, value: Any, info: ValidationInfo) -> Any:
        """A JSON `n` is a JSON integer: not true, not "2", not 2.0. Form fields
        are text by nature, so there "2" is read as 2."""
        from_form = bool(info.context and info.context.get("form"))
        if from_form and isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer from 1 to {MODEL_MAX_N}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value


def _validation_error(exc: ValidationError) -> InvalidRequest:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    what = err["msg"]
    if err["type"] == "missing":
        what = "is required"
    elif err["type"] == "extra_forbidden":
        what = "is not a known field"
    elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
        what = str(err["ctx"]["error"])
    return InvalidRequest(f"{param}: {what}" if param else what, param=param, code="invalid_value")


def parse_body(raw: dict[str, Any], *, form: bool = False) -> ImageBody:
    """`raw` validated; `form` when its fields came as multipart text rather than JSON values."""
    try:
        return ImageBody.model_validate(raw, context={"form": form})
    except ValidationError as exc:
        raise _validation_error(exc) from None


def build_job(
    body: ImageBody,
    *,
    kind: JobKind,
    references: list[ReferenceImage],
    max_prompt_chars: int,
    deadline_s: float,
    caller: str | None,
    known_backends: set[str],
    request_id: str,
    disabled_backends: Collection[str] = (),
) -> ImageJob:
    """Check every model-wide limit and assemble the job.

    `disabled_backends` are configured but not enabled (e.g. no credential):
    pinning one, by `model` or by `provider.only`, is the caller's 400, the
    same answer either way, since no retry can help until an operator acts."""
    if body.stream and body.response_format == "url" and "response_format" in body.model_fields_set:
        # A stream carries the image itself, as OpenAI's does (docs/design.md#streaming).
        raise InvalidRequest("stream=true sends the image as b64_json in the stream; omit response_format or set it to b64_json", param="response_format", code="unsupported_parameter")
    if len(body.prompt) > max_prompt_chars:
        raise InvalidRequest(f"prompt is {len(body.prompt)} characters; the limit is {max_prompt_chars}", param="prompt", code="prompt_too_long")
    if body.background == "transparent":
        raise InvalidRequest("background=transparent is not supported: FLUX.2 [klein] renders opaque images", param="background", code="unsupported_parameter")
    pinned = None
    if body.model is not None:
        pinned = resolve_model(body.model, known_backends)
        if pinned is False:
            raise NotFound(f"model {echo(body.model)!r} does not exist; use flux-2-klein-4b (optionally prefixed by a backend, e.g. fal/flux-2-klein-4b)", param="model", code="model_not_found")
        if pinned and pinned in disabled_backends:
            raise _disabled([pinned], known_backends, disabled_backends, "model")
    if kind is JobKind.EDIT and not references:
        raise InvalidRequest("an edit needs 1 to 4 reference images", param="image", code="missing_image")
    if len(references) > MODEL_MAX_REFERENCES:
        raise InvalidRequest(f"at most {MODEL_MAX_REFERENCES} reference images, got {len(references)}", param="image", code="too_many_images")
    first = references[0] if references else None
    ref_size = (first.width, first.height) if first and first.width and first.height else None
    width, height = resolve_size(body.size, body.aspect_ratio, body.image_size, ref_size if kind is JobKind.EDIT else None)
    _check_size(width, height)
    intent = size_intent(body.size, body.aspect_ratio, body.image_size)
    if body.steps is not None and body.num_inference_steps is not None and body.steps != body.num_inference_steps:
        raise InvalidRequest("steps and num_inference_steps disagree; give one", param="num_inference_steps", code="invalid_value")
    steps = body.num_inference_steps or body.steps or 4
    prefs = ProviderPrefs()
    if body.provider is not None:
        unknown = [n for n in (*body.provider.order, *body.provider.only, *body.provider.ignore) if n not in known_backends]
        if unknown:
            raise InvalidRequest(f"provider names unknown backend(s): {', '.join(sorted(set(unknown)))}; known: {', '.join(sorted(known_backends))}", param="provider", code="unknown_backend")
        p = body.provider
        if p.only and all(name in disabled_backends for name in p.only):
            raise _disabled(p.only, known_backends, disabled_backends, "provider")
        prefs = ProviderPrefs(order=tuple(p.order), only=tuple(p.only), ignore=tuple(p.ignore), max_price=p.max_price, allow_fallbacks=p.allow_fallbacks)
    fmt = "jpeg" if body.output_format == "jpg" else body.output_format
    return ImageJob(
        kind=kind,
        prompt=body.prompt,
        width=width,
        height=height,
        n=body.n,
        steps=steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        output_format=fmt,
        output_compression=body.output_compression,
        response_format="b64_json" if body.stream else body.response_format,
        references=tuple(references),
        enable_safety_checker=body.enable_safety_checker,
        pinned_backend=pinned or None,
        prefs=prefs,
        deadline_s=deadline_s,
        caller=caller,
        request_id=request_id,
        size_intent=intent,
        stream=body.stream,
        partial_images=(body.partial_images or 0) if body.stream else 0,
    )


def _disabled(names: Collection[str], known: Collection[str], disabled: Collection[str], param: str) -> InvalidRequest:
    enabled = sorted(set(known) - set(disabled))
    which = ", ".join(sorted(set(names)))
    return InvalidRequest(
        f"backend {which} is not enabled on this gateway; enabled backends: {', '.join(enabled) or 'none'}",
        param=param, code="backend_disabled",
    )  # fmt: skip


def _check_size(width: int, height: int) -> None:
    if width % MODEL_MULTIPLE or height % MODEL_MULTIPLE:
        raise InvalidRequest(f"size {width}x{height}: width and height must be multiples of {MODEL_MULTIPLE}", param="size", code="invalid_size")
    if not (MODEL_MIN_SIDE <= width <= MODEL_MAX_SIDE and MODEL_MIN_SIDE <= height <= MODEL_MAX_SIDE):
        raise InvalidRequest(f"size {width}x{height}: width and height must each be {MODEL_MIN_SIDE} to {MODEL_MAX_SIDE}", param="size", code="invalid_size")
    if width * height > MODEL_MAX_PIXELS:
        raise InvalidRequest(f"size {width}x{height}: at most {MODEL_MAX_PIXELS:,} pixels (4 MP)", param="size", code="invalid_size")
