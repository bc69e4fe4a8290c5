"""Size tables the emulated providers use to turn their inputs into pixels."""

from __future__ import annotations

import base64
import io
import math

from PIL import Image

from gateway.providers.replicate import DEFAULT_SIZES as REPLICATE_SIZES

# Replicate klein-4b at output_megapixels "1": the adapter's one table of the
# sizes Lumenfall publishes for its 1K tier, read by aspect ratio. Not all
# are multiples of 16.
REPLICATE_1MP: dict[str, tuple[int, int]] = {spec.aspect_ratio: size for size, spec in REPLICATE_SIZES.items() if spec.output_megapixels == "1"}
# Values of output_megapixels were not found (docs/providers/replicate.md#choices-made); these are the plausible ones.
REPLICATE_MEGAPIXELS: tuple[str, ...] = ("0.25", "0.5", "1", "2", "4")
REPLICATE_ASPECT_RATIOS: tuple[str, ...] = ("match_input_image", *REPLICATE_1MP)


def replicate_size(aspect_ratio: str, megapixels: str, first_image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Pixels for (aspect_ratio, output_megapixels).

    At "1" the published table; elsewhere the same rule the table follows
    (width = sqrt(MP * 2**20 * ratio), height = MP * 2**20 / width), so
    "0.25" at 1:1 is 512x512 and "4" is 2048x2048. `match_input_image`
    takes the first input image's ratio, 1:1 when unknown."""
    if aspect_ratio == "match_input_image":
        if first_image_size is None:
            aspect_ratio = "1:1"
        else:
            w, h = first_image_size
            return _by_ratio(w / h, float(megapixels))
    if megapixels == "1":
        return REPLICATE_1MP[aspect_ratio]
    num, den = (int(x) for x in aspect_ratio.split(":"))
    return _by_ratio(num / den, float(megapixels))


def _by_ratio(ratio: float, megapixels: float) -> tuple[int, int]:
    pixels = megapixels * 2**20
    width = math.sqrt(pixels * ratio)
    return round(width), round(pixels / width)


# EmpirioLabs aspect_ratio -> pixels when neither size nor width/height is given.
# The docs list the ratios and the 1,048,576-pixel cap, not the pixels
# (docs/providers/empiriolabs.md#capabilities); these are multiples of 16 under the cap, and
# 1344x768 / 768x1344 are the docs' own examples.
EMPIRIOLABS_ASPECT: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
}


def data_uri_size(value: object) -> tuple[int, int] | None:
    """Width and height of a `data:` URI image (header only), else None.

    URLs are not fetched: the emulators never reach out to the network."""
    if not isinstance(value, str) or not value.startswith("data:"):
        return None
    _, _, payload = value.partition(",")
    try:
        raw = base64.b64decode(payload[: 1 << 16] + "=" * (-len(payload[: 1 << 16]) % 4), validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any unreadable image just means "size unknown"
        return None


def parse_size(value: object) -> tuple[int, int] | None:
    """'WxH' -> (W, H); None if it is not that shape."""
    if not isinstance(value, str):
        return None
    w, sep, h = value.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        return None
    return int(w), int(h)
