"""Real images of the requested size and format, made with Pillow and cached.

Each image shows which backend made it, its size and format, and the prompt,
so a person looking at the gateway's output can see the routing. Rendering
and encoding a 1 MP PNG takes tens of milliseconds, far more than the rest of
a request, so images are cached per (backend, size, format, prompt, label,
padding) in a bounded LRU and served again at `GET /files/{id}.{ext}`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
import textwrap
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

# Pillow format name, media type, file extension, by every spelling providers use.
FORMATS: dict[str, tuple[str, str, str]] = {
    "png": ("PNG", "image/png", "png"),
    "jpeg": ("JPEG", "image/jpeg", "jpeg"),
    "jpg": ("JPEG", "image/jpeg", "jpg"),
    "webp": ("WEBP", "image/webp", "webp"),
}
EXT_MEDIA_TYPES: dict[str, str] = {ext: media for _, media, ext in FORMATS.values()}

BACKEND_COLOURS: dict[str, tuple[int, int, int]] = {
    "fal": (88, 38, 140),
    "replicate": (30, 30, 30),
    "runflow": (20, 80, 160),
    "empiriolabs": (20, 120, 80),
    "local": (170, 80, 20),
}


@dataclass(slots=True)
class StoredImage:
    id: str
    data: bytes
    content_type: str
    ext: str
    width: int
    height: int
    _b64: str | None = field(default=None, repr=False)

    @property
    def file_name(self) -> str:
        return f"{self.id}.{self.ext}"

    def b64(self) -> str:
        if self._b64 is None:
            self._b64 = base64.b64encode(self.data).decode("ascii")
        return self._b64

    def data_uri(self) -> str:
        return f"data:{self.content_type};base64,{self.b64()}"


class ImageStore:
    """Bounded LRU of rendered images, addressable by id for /files.

    Thread-safe: the fleet may be driven from several threads' event loops."""

    def __init__(self, backend: str, max_entries: int = 256, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.backend = backend
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._by_id: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.renders = 0  # cache misses, for tests and stats

    def get(self, image_id: str) -> StoredImage | None:
        with self._lock:
            image = self._by_id.get(image_id)
            if image is not None:
                self._by_id.move_to_end(image_id)
            return image

    def image_id(self, width: int, height: int, fmt: str, prompt: str, label: str = "", pad_to_bytes: int = 0) -> str:
        key = f"{self.backend}|{width}x{height}|{fmt}|{pad_to_bytes}|{label}|{prompt}"
        return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()

    def cached(self, width: int, height: int, fmt: str, prompt: str, label: str = "", pad_to_bytes: int = 0) -> StoredImage | None:
        return self.get(self.image_id(width, height, fmt, prompt, label, pad_to_bytes))

    def render(self, width: int, height: int, fmt: str, prompt: str, label: str = "", pad_to_bytes: int = 0) -> StoredImage:
        """The cached image for these parameters, rendering it on a miss."""
        image_id = self.image_id(width, height, fmt, prompt, label, pad_to_bytes)
        cached = self.get(image_id)
        if cached is not None:
            return cached
        pil_format, media_type, ext = FORMATS[fmt]
        data = encode(draw(self.backend, width, height, fmt, prompt, label), pil_format)
        data = pad(data, pil_format, pad_to_bytes)
        image = StoredImage(image_id, data, media_type, ext, width, height)
        with self._lock:
            self.renders += 1
            if image_id not in self._by_id:
                self._by_id[image_id] = image
                self._bytes += len(data)
            while self._by_id and (len(self._by_id) > self.max_entries or self._bytes > self.max_bytes):
                _, old = self._by_id.popitem(last=False)
                self._bytes -= len(old.data)
        return image

    def clear(self) -> None:
        with self._lock:
            self._by_id.clear()
            self._bytes = 0


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw(backend: str, width: int, height: int, fmt: str, prompt: str, label: str = "") -> Image.Image:
    """A card: backend name large, then size/format/label, then the prompt."""
    colour = BACKEND_COLOURS.get(backend, (60, 60, 60))
    image = Image.new("RGB", (width, height), colour)
    pen = ImageDraw.Draw(image)
    # a band of lighter colour so the frame and aspect ratio are visible
    band = tuple(min(255, c + 50) for c in colour)
    edge = max(2, min(width, height) // 64)
    pen.rectangle((0, 0, width - 1, height - 1), outline=band, width=edge)
    short = min(width, height)
    big = _font(max(10, short // 6))
    small = _font(max(8, short // 22))
    margin = max(4, short // 16)
    y = margin
    pen.text((margin, y), backend, fill=(255, 255, 255), font=big)
    y += max(10, short // 6) + margin // 2
    info = f"{width}x{height} {fmt}" + (f"  {label}" if label else "")
    pen.text((margin, y), info, fill=(230, 230, 230), font=small)
    y += max(8, short // 22) * 2
    chars = max(8, int((width - 2 * margin) / max(4, short // 44)))
    line_height = max(8, short // 22) + 2
    for line in textwrap.wrap(prompt, width=chars)[: max(1, (height - y - margin) // line_height)]:
        pen.text((margin, y), line, fill=(255, 255, 200), font=small)
        y += line_height
    return image


def encode(image: Image.Image, pil_format: str) -> bytes:
    out = io.BytesIO()
    if pil_format == "PNG":
        image.save(out, "PNG", compress_level=1)
    elif pil_format == "JPEG":
        image.save(out, "JPEG", quality=85)
    else:
        image.save(out, "WEBP", quality=80, method=0)
    return out.getvalue()


def pad(data: bytes, pil_format: str, pad_to_bytes: int) -> bytes:
    """Grow an encoded image to at least `pad_to_bytes` with random filler
    that every decoder skips (a private PNG chunk, JPEG COM segments, a WebP
    extended-format chunk). Random, so transport compression cannot undo it."""
    missing = pad_to_bytes - len(data)
    if missing <= 0:
        return data
    if pil_format == "PNG":
        return _pad_png(data, missing)
    if pil_format == "JPEG":
        return _pad_jpeg(data, missing)
    return _pad_webp(data, missing)


def _pad_png(data: bytes, missing: int) -> bytes:
    filler = os.urandom(max(0, missing - 12))
    chunk_type = b"kpAd"  # ancillary, private, safe to copy
    chunk = struct.pack(">I", len(filler)) + chunk_type + filler + struct.pack(">I", zlib.crc32(chunk_type + filler) & 0xFFFFFFFF)
    return data[:-12] + chunk + data[-12:]  # before IEND


def _pad_jpeg(data: bytes, missing: int) -> bytes:
    segments = []
    while missing > 0:
        size = min(65533, max(1, missing - 4))
        segments.append(b"\xff\xfe" + struct.pack(">H", size + 2) + os.urandom(size))
        missing -= size + 4
    return data[:2] + b"".join(segments) + data[2:]  # right after SOI


def _pad_webp(data: bytes, missing: int) -> bytes:
    """Rewrap a simple (VP8/VP8L) WebP as extended format with a filler chunk."""
    body = data[12:]
    fourcc = body[:4]
    if fourcc == b"VP8X":
        chunks = body
        vp8x = None
    else:
        width, height = _webp_size(body)
        vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks = body
    size = max(0, missing - 8 - (18 if vp8x else 0))
    size += size & 1  # chunks are padded to even sizes
    filler = b"KPAD" + struct.pack("<I", size) + os.urandom(size)
    payload = b"WEBP" + (vp8x or b"") + chunks + filler
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def _webp_size(body: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body)) as im:
        return im.size
