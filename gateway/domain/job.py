"""ImageJob: one validated, provider-neutral request.

Everything after the HTTP layer sees only this. It says what the caller wants
(size, count, steps, references, formats), never how they asked for it.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Literal

OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["url", "b64_json"]

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobKind(StrEnum):
    GENERATE = "generate"
    EDIT = "edit"


@dataclass(frozen=True, slots=True)
class ReferenceImage:
    """A reference image for an edit: uploaded bytes, or a caller's URL.

    `data` is set for uploads and data URIs (already sniffed and size-checked);
    `url` is set for https URLs the caller gave, fetched only if a backend
    needs bytes. `width`/`height` are known when we have the bytes.
    """

    content_type: str
    data: bytes | None = None
    url: str | None = None
    width: int | None = None
    height: int | None = None

    def data_uri(self) -> str:
        if self.data is None:
            raise ValueError("reference has no bytes; fetch it first")
        return f"data:{self.content_type};base64,{base64.b64encode(self.data).decode()}"

    @property
    def megapixels(self) -> float | None:
        if self.width is None or self.height is None:
            return None
        return self.width * self.height / 1_000_000


@dataclass(frozen=True, slots=True)
class ProviderPrefs:
    """OpenRouter-style routing preferences carried in the body as `provider`."""

    order: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    max_price: Decimal | None = None
    allow_fallbacks: bool = True


@dataclass(frozen=True, slots=True)
class SizeIntent:
    """How strictly the size must be kept.

    `exact`: the caller named the pixels (`size: "1344x768"`, `image_size:
    {width, height}`), and no backend may change them. Otherwise (an
    `aspect_ratio`, a fal `image_size` preset, `size: auto` or no size) the
    resolved size is a target: a backend may serve its own native size near it
    (gateway/domain/native_sizes.py). `ratio` is the caller's aspect ratio when they
    gave one, so nearness is measured against what they asked for rather
    than its rounding onto the 16-pixel grid."""

    exact: bool = True
    ratio: tuple[int, int] | None = None


EXACT_SIZE = SizeIntent()


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ImageJob:
    kind: JobKind
    prompt: str
    width: int
    height: int
    n: int = 1
    steps: int = 4
    guidance_scale: float | None = None
    seed: int | None = None
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    response_format: ResponseFormat = "url"
    references: tuple[ReferenceImage, ...] = ()
    enable_safety_checker: bool = True
    pinned_backend: str | None = None
    prefs: ProviderPrefs = field(default_factory=ProviderPrefs)
    deadline_s: float = 120.0
    caller: str | None = None
    request_id: str = field(default_factory=new_request_id)
    size_intent: SizeIntent = EXACT_SIZE
    # The answer goes out as server-sent events (gateway/http/streaming.py);
    # `partial_images` is how many previews per image the caller would take
    # (0-3, an upper bound: a backend that makes none sends none).
    stream: bool = False
    partial_images: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def megapixels(self) -> Decimal:
        """Output megapixels of one image, exact: width x height / 1,000,000."""
        return Decimal(self.width * self.height) / Decimal(1_000_000)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.output_format]
