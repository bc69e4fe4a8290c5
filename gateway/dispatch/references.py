"""Reference images for edits: checked on the way in, fetched only when needed.

Uploads and data URIs are checked by content (magic bytes, not the declared
type), by byte size, and by pixel count read from the header alone, so a
decompression bomb is refused before anything decodes it. Caller URLs are kept
as URLs (hosted backends fetch them themselves) and fetched by the gateway only
for a backend that needs bytes; never from loopback, private, link-local or
otherwise non-public addresses (`gateway.net.addresses` says which).

The same rule holds at both ends. On arrival (`parse_reference`, then
`vet_reference_hosts`) a URL whose host is a non-public literal, a
non-standard IPv4 spelling (`127.1`, `2852039166`), `localhost`, or a name
resolving to any non-public address is refused with 400 `invalid_image_url`,
so it is never passed on to a hosted provider. A name that does not exist
(NXDOMAIN) is refused the same way: no provider could fetch it either, and a
name that resolves only inside a provider's network must not be passed on.
A resolver that does not answer in time gets 503 `reference_dns_unavailable`
(retryable), never a guess. When the gateway fetches (`fetch_reference`) the
fetch client's `PinnedTransport` resolves once and connects to the address it
checked, so a rebinding DNS answer has no window.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import threading
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import SplitResult, urlsplit

import httpx
from PIL import Image

from gateway.domain.errors import GatewayError, InvalidRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from gateway.domain.job import ReferenceImage
from gateway.domain.media import sniff
from gateway.net.addresses import HostRefused, refuse_unless_public_host
from gateway.net.pinning import AddressRefused, HostUnresolved, Resolver, public_addresses

MAX_REFERENCE_BYTES = 16 * 1024 * 1024
MAX_REFERENCE_PIXELS = 4096 * 4096  # larger is resized by every backend anyway
MIN_REFERENCE_SIDE = 64  # the pipeline's minimum (docs/local-backend.md#calling-the-pipeline)
MAX_REFERENCE_ASPECT = 8.0


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
    """A JSON `images` entry: a data URI (checked now) or an http(s) URL (checked
    for shape and for a plainly non-public host; its name is resolved by
    `vet_reference_hosts`)."""
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
    target = split_reference_url(value, param)
    try:
        refuse_unless_public_host(target.host)
    except HostRefused as exc:
        raise InvalidRequest(f"reference URLs must point at public addresses: {exc}", param=param, code="invalid_image_url") from None
    return ReferenceImage(content_type="application/octet-stream", url=value)


class UrlTarget(NamedTuple):
    host: str
    port: int


_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_reference_url(value: str, param: str) -> UrlTarget:
    """The host and port of an http(s) reference URL; 400 for anything malformed
    (an unbalanced `[`, a port that is not a number from 1 to 65535)."""
    if len(value) > 4096:
        raise InvalidRequest("reference URL is too long", param=param, code="invalid_image_url")
    try:
        parts: SplitResult = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        reason = "its port must be a number from 1 to 65535" if "port" in str(exc).lower() else "it is malformed"
        raise InvalidRequest(f"reference URL is not a valid URL: {reason}", param=param, code="invalid_image_url") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidRequest("reference URLs must be http(s) URLs or data: URIs", param=param, code="invalid_image_url")
    if port == 0:
        raise InvalidRequest("reference URL is not a valid URL: its port must be a number from 1 to 65535", param=param, code="invalid_image_url")
    return UrlTarget(parts.hostname, port or _DEFAULT_PORTS[parts.scheme])


async def vet_reference_hosts(references: Sequence[ReferenceImage], resolver: Resolver) -> None:
    """Resolve every URL reference's host (concurrently) and refuse the request
    unless each resolves to public addresses only; see the module docstring
    for names that do not resolve."""
    checks = [(i, ref.url) for i, ref in enumerate(references) if ref.data is None and ref.url]
    if not checks:
        return
    results = await asyncio.gather(*(_vet_one(url, f"images[{i}]", resolver) for i, url in checks), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _vet_one(url: str, param: str, resolver: Resolver) -> None:
    target = split_reference_url(url, param)
    try:
        await public_addresses(target.host, target.port, resolver)
    except HostRefused as exc:
        raise InvalidRequest(f"reference URLs must point at public addresses: {exc}", param=param, code="invalid_image_url") from None
    except HostUnresolved as exc:
        if exc.permanent:
            raise InvalidRequest(f"reference URL host {exc}", param=param, code="invalid_image_url") from None
        raise GatewayError(f"reference URL host {exc}; retry shortly", status=503, code="reference_dns_unavailable", param=param, retryable=True, retry_after=1) from None


async def fetch_reference(ref: ReferenceImage, client: httpx.AsyncClient, timeout: float = 10.0) -> ReferenceImage:
    """Bytes for a URL reference, refusing non-public hosts and oversized bodies.

    `client` must connect through a `PinnedTransport` (the gateway's fetch
    client does): it resolves the host once, checks every address and connects
    to the checked one. Literal hosts are checked here too. Redirects are not
    followed (each hop would need the same check)."""
    if ref.data is not None or ref.url is None:
        return ref
    target = split_reference_url(ref.url, "images")
    try:
        refuse_unless_public_host(target.host)
    except HostRefused as exc:
        raise InvalidRequest(f"reference URLs must point at public addresses: {exc}", param="images", code="invalid_image_url") from None
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
        if isinstance(exc.__cause__, AddressRefused):
            raise InvalidRequest(f"reference URL does not resolve to a public address: {exc.__cause__}", param="images", code="invalid_image_url") from None
        raise InvalidRequest(f"reference URL could not be fetched: {type(exc).__name__}", param="images", code="invalid_image_url") from None
    checked = check_image_bytes(b"".join(chunks), "images")
    return ReferenceImage(content_type=checked.content_type, data=checked.data, url=ref.url, width=checked.width, height=checked.height)
