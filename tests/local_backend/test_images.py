"""Reference images in, output images out."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from local_backend.images import BadReference, encode, read_reference


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_reference_from_base64_and_data_uri() -> None:
    data = png(96, 64)
    for text in (base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()):
        ref = read_reference(0, text)
        assert (ref.width, ref.height) == (96, 64) and ref.data == data
        assert ref.decode().size == (96, 64)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"plain text").decode(), "not a readable image"),
        (base64.b64encode(png(32, 64)).decode(), "at least 64 px"),
        (base64.b64encode(png(64 * 9, 64)).decode(), "8:1"),
    ],
)
def test_bad_references_are_named(text: str, problem: str) -> None:
    with pytest.raises(BadReference, match=rf"reference_images\[2\].*{problem}"):
        read_reference(2, text)


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_formats(fmt: str, pil_format: str) -> None:
    data = encode(Image.new("RGB", (64, 48), (1, 2, 3)), fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_format and image.size == (64, 48)


def test_compression_makes_jpeg_smaller() -> None:
    noisy = Image.effect_noise((128, 128), 80).convert("RGB")
    assert len(encode(noisy, "jpeg", compression=90)) < len(encode(noisy, "jpeg", compression=0))
