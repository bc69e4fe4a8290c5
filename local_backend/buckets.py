"""Sizes, buckets and batch keys: which requests may share one pipeline call.

The choice made here (docs/local-backend.md#batching):

* Accepted sizes are exact: any width and height that are multiples of 16
  within the configured limits (64..2048 per side, at most `max_pixels`). A
  request is never snapped to another size, so the gateway always gets exactly
  the size it asked for.
* Batches are formed by an exact key `(width, height, steps, reference digest)`
  because `Flux2KleinPipeline` takes one height/width/step count per call and
  repeats the reference images for every item (docs/local-backend.md#calling-the-pipeline). Prompts and seeds
  may differ inside a batch.
* Buckets are a short preset list (fal's six presets by default). They are what
  warm-up runs and what `/v1/info` reports speed for, and the only sizes that
  get their own metric label; every other size is labelled "other" so metric
  cardinality stays bounded.
* The cap on images per pipeline call depends on pixels: at most
  `max_batch_pixels / (width * height)` images, between 1 and
  `max_batch_images` (docs/local-backend.md#batching: about 4 images at 1 MP, 8 at 0.25 MP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The model's limits (multiples of 16: 8x VAE downsampling then 2x2 patches,
# docs/local-backend.md#the-model-and-its-pipeline), shared with the gateway's eligibility check.
from gateway.domain.capabilities import MODEL_MAX_PIXELS, MODEL_MAX_SIDE, MODEL_MIN_SIDE, MODEL_MULTIPLE

# fal's presets (docs/local-backend.md#batching), as the gateway resolves `image_size`.
from gateway.domain.sizes import FAL_PRESETS

DEFAULT_BUCKETS: tuple[tuple[int, int], ...] = tuple(FAL_PRESETS.values())
SIZE_MULTIPLE = MODEL_MULTIPLE
OTHER_BUCKET = "other"


@dataclass(frozen=True, slots=True)
class SizeLimits:
    min_side: int = MODEL_MIN_SIDE
    max_side: int = MODEL_MAX_SIDE
    max_pixels: int = MODEL_MAX_PIXELS


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Requests with equal keys can run in one pipeline call."""

    width: int
    height: int
    steps: int
    references: str | None = None  # digest of the reference images, in order

    @property
    def size(self) -> str:
        return size_label(self.width, self.height)


def size_label(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); also accepts a fal preset name."""
    text = text.strip().lower()
    if text in FAL_PRESETS:
        return FAL_PRESETS[text]
    width, sep, height = text.partition("x")
    if not sep:
        raise ValueError(f"size must look like 1024x768, got {text!r}")
    return int(width), int(height)


def parse_sizes(items: str | Iterable[str | Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """A comma-separated string or a list of sizes -> ((w, h), ...)."""
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    sizes: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, str):
            sizes.append(parse_size(item))
        else:
            width, height = item
            sizes.append((int(width), int(height)))
    return tuple(sizes)


def size_problem(width: int, height: int, limits: SizeLimits) -> str | None:
    """Why this size cannot be served, or None when it can."""
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        return f"width and height must be multiples of {SIZE_MULTIPLE}"
    if not (limits.min_side <= width <= limits.max_side and limits.min_side <= height <= limits.max_side):
        return f"width and height must be {limits.min_side} to {limits.max_side}"
    if width * height > limits.max_pixels:
        return f"at most {limits.max_pixels:,} pixels per image"
    return None


def reference_digest(references: Sequence[bytes]) -> str | None:
    """One digest for an ordered set of reference images; None without references."""
    if not references:
        return None
    digest = hashlib.sha256()
    for data in references:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def batch_cap(width: int, height: int, *, max_images: int, max_pixels: int) -> int:
    """How many images of this size one pipeline call may hold."""
    return max(1, min(max_images, max_pixels // (width * height)))


def bucket_label(width: int, height: int, buckets: Iterable[tuple[int, int]]) -> str:
    """The metric label of a size: itself when it is a bucket, else 'other'."""
    return size_label(width, height) if (width, height) in set(buckets) else OTHER_BUCKET
