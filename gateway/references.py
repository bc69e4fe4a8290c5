"""Reference images for edits: checked on the way in, fetched only when needed.

Uploads and data URIs are checked by content (magic bytes, not the declared
type), by byte size, and by pixel count read from the header alone, so a
decompression bomb is refused before anything decodes it. Caller URLs are kept
as URLs (hosted backends fetch them themselves) and fetched by the gateway only
for a backend that needs bytes; never from loopback, private, link-local or
otherwise non-public addresses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
import threading
from urllib.parse import urlsplit

import httpx
from PIL import Image

from gateway.errors import InvalidRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from gateway.job import ReferenceImage

MAX_REFERENCE_BYTES = 16 * 1024 * 1024
MAX_REFERENCE_PIXELS = 4096 * 4096  # larger is resized by every backend anyway
MIN_REFERENCE_SIDE = 64  # the pipeline's minimum (local_backend.md section 1.3)
MAX_REFERENCE_ASPECT = 8.0

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


def sniff(data: bytes) -> str | None:
    """The image type from the first bytes, or None if it is not an image we take."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_image_bytes(data: bytes, param: str = "image") -> ReferenceImage:
    """Validate uploaded or inlined bytes and describe them."""
    if not data:
        raise InvalidRequest("reference image is empty", param=param, code="invalid_image")
    if len(data) > MAX_REFERENCE_BYTES:
        raise PayloadTooLarge(f"reference image is {len(data):,} bytes; the limit is {MAX_REFERENCE_BYTES:,}", param=param)
    kind = sniff(data)
    if kind is None:
        raise UnsupportedMediaType("reference image must be PNG, JPEG or WebP (checked by content)", param=param)
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"reference image has too many pixels; at most {MAX_REFERENCE_PIXELS:,}", param=param) from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for broken files
        raise InvalidRequest("reference image could not be read", param=param, code="invalid_image") from None
    if width * height > MAX_REFERENCE_PIXELS:
        raise PayloadTooLarge(f"reference image is {width}x{height}; at most {MAX_REFERENCE_PIXELS:,} pixels", param=param)
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise InvalidRequest(f"reference image is {width}x{height}; each side must be at least {MIN_REFERENCE_SIDE}", param=param, code="invalid_image")
    if max(width, height) / min(width, height) > MAX_REFERENCE_ASPECT:
        raise InvalidRequest("reference image aspect ratio must be at most 8:1", param=param, code="invalid_image")
    return ReferenceImage(content_type=kind, data=data, width=width, height=height)


# Full decodes at once, per process: each holds up to 4096x4096 RGBA (64 MiB)
# and a core; more wait their turn in their worker thread, never on the event loop.
_DECODE_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def check_decodes(data: bytes, param: str = "image") -> None:
    """Decode every pixel of bytes that passed `check_image_bytes` (whose header
    checks bound the work), so a truncated or corrupt file is the caller's 422
    here, not a backend's failure later. Blocking: 5 ms to over a second per
    image (bench/references.py), so callers run it in a worker thread."""
    with _DECODE_SLOTS:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception:  # noqa: BLE001 - Pillow raises many types for broken pixel data
            raise Unprocessable("reference image could not be decoded: its pixel data is truncated or corrupt", param=param, code="invalid_image") from None


def parse_reference(value: object, param: str) -> ReferenceImage:
    """A JSON `images` entry: a data URI (checked now) or an http(s) URL (checked for shape)."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest("each reference must be an image URL or a data: URI", param=param, code="invalid_image")
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidRequest("data URIs must be base64 encoded (data:image/png;base64,...)", param=param, code="invalid_image")
        if len(payload) > MAX_REFERENCE_BYTES * 4 // 3 + 4:
            raise PayloadTooLarge(f"reference image is over {MAX_REFERENCE_BYTES:,} bytes", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("data URI is not valid base64", param=param, code="invalid_image") from None
        return check_image_bytes(data, param)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("reference URLs must be http(s) URLs or data: URIs", param=param, code="invalid_image_url")
    if len(value) > 4096:
        raise InvalidRequest("reference URL is too long", param=param, code="invalid_image_url")
    if _literal_ip_not_public(parts.hostname):
        raise InvalidRequest("reference URLs must point at public addresses", param=param, code="invalid_image_url")
    return ReferenceImage(content_type="application/octet-stream", url=value)


def _literal_ip_not_public(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost")
    return not addr.is_global


async def _resolves_public(host: str, port: int) -> bool:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_global for info in infos)


async def fetch_reference(ref: ReferenceImage, client: httpx.AsyncClient, timeout: float = 10.0) -> ReferenceImage:
    """Bytes for a URL reference, refusing non-public hosts and oversized bodies.

    The host is resolved and checked before connecting; redirects are not
    followed (each hop would need the same check)."""
    if ref.data is not None or ref.url is None:
        return ref
    parts = urlsplit(ref.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if _literal_ip_not_public(host) or not await _resolves_public(host, port):
        raise InvalidRequest("reference URL does not resolve to a public address", param="images", code="invalid_image_url")
    try:
        async with client.stream("GET", ref.url, timeout=timeout, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise InvalidRequest(f"reference URL answered HTTP {resp.status_code}", param="images", code="invalid_image_url")
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > MAX_REFERENCE_BYTES:
                    raise PayloadTooLarge(f"reference image is over {MAX_REFERENCE_BYTES:,} bytes", param="images")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"reference URL could not be fetched: {type(exc).__name__}", param="images", code="invalid_image_url") from None
    checked = check_image_bytes(b"".join(chunks), "images")
    return ReferenceImage(content_type=checked.content_type, data=checked.data, url=ref.url, width=checked.width, height=checked.height)
