"""Resolve the ways a caller can ask for a size into one width and height.

OpenAI's `size` ("WxH" or "auto"), an `aspect_ratio` ("16:9") and fal's
`image_size` presets all end as (width, height). Pure.
"""

from __future__ import annotations

import math
import re
from typing import Any

from gateway.domain.capabilities import MODEL_MULTIPLE
from gateway.domain.errors import InvalidRequest
from gateway.domain.job import EXACT_SIZE, SizeIntent

DEFAULT_SIZE = (1024, 1024)

# fal's presets (docs/providers/fal.md#capabilities-and-sizes: third-party
# consensus; fal's own 4B docs were not available).
FAL_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

# Aspect ratios resolve to about one megapixel, on the 16-pixel grid, never
# above 1,048,576 pixels so that every backend's 1 MP tier can take them
# (EmpirioLabs caps at exactly that; docs/providers/empiriolabs.md#capabilities).
ASPECT_TARGET_PIXELS = 1_048_576

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")


def parse_size(value: str, param: str = "size") -> tuple[int, int]:
    match = _SIZE.match(value)
    if not match:
        raise InvalidRequest(f"{param} must be 'WIDTHxHEIGHT' (e.g. '1024x768') or 'auto', got {value[:40]!r}", param=param, code="invalid_size")
    return int(match.group(1)), int(match.group(2))


def parse_aspect_ratio(value: str) -> tuple[int, int]:
    """'16:9' -> (16, 9); 400 for anything else or a ratio past 1:8 / 8:1."""
    match = _RATIO.match(value)
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise InvalidRequest(f"aspect_ratio must look like '16:9', got {value[:40]!r}", param="aspect_ratio", code="invalid_aspect_ratio")
    num, den = int(match.group(1)), int(match.group(2))
    if not 1 / 8 <= num / den <= 8:
        raise InvalidRequest("aspect_ratio must be between 1:8 and 8:1", param="aspect_ratio", code="invalid_aspect_ratio")
    return num, den


def size_for_aspect_ratio(value: str) -> tuple[int, int]:
    num, den = parse_aspect_ratio(value)
    ratio = num / den
    height = math.sqrt(ASPECT_TARGET_PIXELS / ratio)
    h = max(MODEL_MULTIPLE, round(height / MODEL_MULTIPLE) * MODEL_MULTIPLE)
    w = max(MODEL_MULTIPLE, round(h * ratio / MODEL_MULTIPLE) * MODEL_MULTIPLE)
    while w * h > ASPECT_TARGET_PIXELS:
        if w >= h:
            w -= MODEL_MULTIPLE
        else:
            h -= MODEL_MULTIPLE
    return w, h


def size_for_image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        if value not in FAL_PRESETS:
            raise InvalidRequest(f"image_size must be one of {', '.join(FAL_PRESETS)} or {{width, height}}", param="image_size", code="invalid_size")
        return FAL_PRESETS[value]
    if isinstance(value, dict) and set(value) <= {"width", "height"}:
        w, h = value.get("width"), value.get("height")
        if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and not isinstance(h, bool):
            return w, h
    raise InvalidRequest('image_size must be a preset name or {"width": int, "height": int}', param="image_size", code="invalid_size")


def resolve_size(size: str | None, aspect_ratio: str | None, image_size: Any, reference_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) from whichever of the three the caller gave.

    Giving more than one is ambiguous and refused. `auto` (or nothing) means
    1024x1024, or for an edit the first reference's size snapped down to the
    16-pixel grid, as fal's edit endpoint does when image_size is omitted."""
    given = [name for name, v in (("size", size if size not in (None, "auto") else None), ("aspect_ratio", aspect_ratio), ("image_size", image_size)) if v is not None]
    if len(given) > 1:
        raise InvalidRequest(f"give only one of size, aspect_ratio, image_size (got {', '.join(given)})", param=given[1], code="ambiguous_size")
    if size not in (None, "auto"):
        return parse_size(size)
    if aspect_ratio is not None:
        return size_for_aspect_ratio(aspect_ratio)
    if image_size is not None:
        return size_for_image_size(image_size)
    if reference_size is not None:
        return _snap_reference(*reference_size)
    return DEFAULT_SIZE


def size_intent(size: str | None, aspect_ratio: str | None, image_size: Any) -> SizeIntent:
    """Whether the caller named exact pixels. Call after `resolve_size`, which
    has already refused ambiguous or malformed values.

    Exact: `size: "WxH"` or `image_size: {width, height}`. Flexible: an
    aspect ratio, a preset name, `size: auto` or no size at all: the caller
    asked for a shape, not for pixels."""
    if size not in (None, "auto") or isinstance(image_size, dict):
        return EXACT_SIZE
    return SizeIntent(exact=False, ratio=parse_aspect_ratio(aspect_ratio) if aspect_ratio is not None else None)


def _snap_reference(w: int, h: int) -> tuple[int, int]:
    scale = min(1.0, math.sqrt(ASPECT_TARGET_PIXELS * 4 / (w * h)), 2048 / max(w, h))
    w2 = max(64, int(w * scale) // MODEL_MULTIPLE * MODEL_MULTIPLE)
    h2 = max(64, int(h * scale) // MODEL_MULTIPLE * MODEL_MULTIPLE)
    return w2, h2
