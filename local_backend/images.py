"""Image bytes in and out: reference images from base64, outputs as png/jpeg/webp."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

# What the pipeline accepts as a reference (docs/local-backend.md#calling-the-pipeline).
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8.0
DEFAULT_QUALITY = 90


class BadReference(ValueError):
    """A reference image that cannot be used; the message names the image.

    Answered as 422 `invalid_reference_image`: the input's fault, which the
    gateway must not count against this service's health."""


@dataclass(frozen=True, slots=True)
class Reference:
    data: bytes
    width: int
    height: int

    def decode(self) -> Image.Image:
        with Image.open(io.BytesIO(self.data)) as image:
            return image.convert("RGB")


def read_reference(index: int, text: str) -> Reference:
    """Base64 or a data: URI -> checked reference, decoded in full here so that a
    broken file is the request's 422, never a failed batch (and a 500) later."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadReference(f"reference_images[{index}] is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - Pillow raises many types for broken files
        raise BadReference(f"reference_images[{index}] is not a readable image") from None
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise BadReference(f"reference_images[{index}] must be at least {MIN_REFERENCE_SIDE} px per side")
    if max(width, height) / min(width, height) > MAX_REFERENCE_ASPECT:
        raise BadReference(f"reference_images[{index}] aspect ratio must be at most 8:1")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # every pixel, under Pillow's decompression-bomb guard
    except Exception:  # noqa: BLE001 - Pillow raises many types for broken pixel data
        raise BadReference(f"reference_images[{index}] could not be decoded: truncated or corrupt pixel data") from None
    return Reference(data=data, width=width, height=height)


def encode(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    """Encode one output image. `compression` follows OpenAI's `output_compression`
    (0-100, higher = smaller): quality = 100 - compression for jpeg/webp, zlib level for png."""
    buffer = io.BytesIO()
    pil_format = _PIL_FORMATS[output_format]
    if output_format == "png":
        level = 6 if compression is None else round(compression * 9 / 100)
        image.save(buffer, pil_format, compress_level=level)
    else:
        quality = DEFAULT_QUALITY if compression is None else max(1, 100 - compression)
        image.convert("RGB").save(buffer, pil_format, quality=quality)
    return buffer.getvalue()
