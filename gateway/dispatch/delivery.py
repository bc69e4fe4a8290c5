"""Shape a provider's images into what the caller asked for.

`url` or `b64_json`, in the requested format, with the requested size. Images
are decoded only when they must be transcoded; otherwise only their header is
read to check the size. A provider URL in the right format is passed through
when the caller wants a URL: unread if the adapter vouches for its size
(`verify_size`), else after a Range request for its first 64 KB, never a
whole download; bytes, or transcoded images, and images whose provider URL
carries a credential (a key-like parameter, a registered secret in any
spelling) are served by the gateway itself from a signed, expiring URL: the
caller never gets a URL that holds a key.
`output_compression` is applied when the gateway transcodes; adapters pass it
to providers that take a quality setting.

A job that asked for exact pixels gets exactly those; a job that asked
for a shape takes any size within the size tolerance
(gateway.domain.native_sizes.acceptable), and each shaped image says the
size it has, so the answer, the bill and the ledger use what was produced.

Every failure here comes after a generation the provider bills: it is a
`DELIVERY_FAILED` (billed once, its own class in the metrics). A download
that failed in transport (connect, reset, timeout) is coded
`DELIVERY_NETWORK`: it may be the gateway's own network, so it does not
count against the backend's health; a wrong, broken or missing image does.
Downloads are streamed and stop at `MAX_OUTPUT_BYTES`, never read whole first.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass

import httpx
from PIL import Image

from gateway.domain.job import MEDIA_TYPES, ImageJob
from gateway.domain.media import sniff
from gateway.domain.native_sizes import DEFAULT_TOLERANCE, SizeTolerance, acceptable
from gateway.images import ImageStore
from gateway.net.wire import Wire, WireTimeout, as_wire
from gateway.providers.base import (
    DELIVERY_NETWORK,
    FailureClass,
    GeneratedImage,
    ProviderError,
)
from gateway.redaction import url_carries_credential

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 60.0


def delivery_failed(message: str, *, network: bool = False) -> ProviderError:
    """A billed generation whose images cannot be handed to the caller."""
    return ProviderError(FailureClass.DELIVERY_FAILED, message, billed=True, code=DELIVERY_NETWORK if network else None)


@dataclass(frozen=True, slots=True)
class ShapedImage:
    url: str | None = None
    b64_json: str | None = None
    nsfw: bool | None = None
    seed: int | None = None
    size: tuple[int, int] | None = None  # (width, height) as produced; None only where a test built one by hand

    def as_openai(self) -> dict[str, str]:
        return {"url": self.url} if self.url is not None else {"b64_json": self.b64_json or ""}


class ResultShaper:
    def __init__(self, wire: Wire | httpx.AsyncClient, store: ImageStore, *, rehost: bool = False, tolerance: SizeTolerance = DEFAULT_TOLERANCE) -> None:
        self.wire = as_wire(wire)
        self.store = store
        self.tolerance = tolerance  # how far a shape request's image may be from the predicted size
        # Provider URLs expire (Runflow's are presigned): with rehost the image
        # is copied into the store and the caller gets the gateway's URL.
        self.rehost = rehost

    async def shape(self, job: ImageJob, images: list[GeneratedImage], *, backend: str, deadline: float, base_url: str, keep_s: int | None = None) -> list[ShapedImage]:
        """`keep_s`: how long images the gateway stores must live, where a
        record that outlives the store's TTL (a job, an idempotent answer) will refer to them."""
        if len(images) < job.n:
            raise delivery_failed(f"returned {len(images)} of {job.n} images")
        if job.n == 1:  # the usual case: no task and gather for one image
            return [await self._one(job, images[0], deadline, base_url, keep_s)]
        return list(await asyncio.gather(*(self._one(job, img, deadline, base_url, keep_s) for img in images[: job.n])))

    async def _one(self, job: ImageJob, img: GeneratedImage, deadline: float, base_url: str, keep_s: int | None = None) -> ShapedImage:
        wanted = MEDIA_TYPES[job.output_format]
        fits = SizeCheck(job, self.tolerance)
        if (
            img.data is None
            and img.b64 is None
            and job.response_format == "url"
            and not self.rehost
            and img.url
            and not img.url.startswith("data:")
            and img.content_type == wanted
            and not url_carries_credential(img.url)
        ):
            if img.width is not None and img.height is not None and fits((img.width, img.height)):
                return ShapedImage(url=img.url, nsfw=img.nsfw, seed=img.seed, size=(img.width, img.height))
            if img.width is None or img.height is None:
                head = await self._head(img.url, deadline)
                size = header_size(head) if sniff(head) == wanted else None
                if size is not None:
                    fits.require(size)
                    return ShapedImage(url=img.url, nsfw=img.nsfw, seed=img.seed, size=size)
        if img.data is None and img.b64 is not None and job.response_format == "b64_json":
            size = pass_through_size(img.b64, wanted, fits, img.b64_head)
            if size is not None:
                return ShapedImage(b64_json=img.b64, nsfw=img.nsfw, seed=img.seed, size=size)
        data = await self._bytes(img, deadline)
        actual = sniff(data)
        if actual is None:
            raise delivery_failed("returned something that is not a PNG, JPEG or WebP image")
        if actual != wanted:
            data, size = await asyncio.to_thread(transcode, data, job.output_format, job.output_compression, fits)
        else:
            size = check_size(data, fits)
        if job.response_format == "b64_json":
            return ShapedImage(b64_json=base64.b64encode(data).decode("ascii"), nsfw=img.nsfw, seed=img.seed, size=size)
        ref = await self.store.put(data, wanted, keep_s=keep_s)
        return ShapedImage(url=await self.store.url(ref, base_url), nsfw=img.nsfw, seed=img.seed, size=size)

    async def _bytes(self, img: GeneratedImage, deadline: float) -> bytes:
        if img.data is not None:
            return img.data
        if img.b64 is not None:
            try:
                return base64.b64decode("".join(img.b64.split()), validate=True)
            except (ValueError, TypeError):
                raise delivery_failed("returned image data that is not base64") from None
        return await self._download(img.url, deadline)

    async def _head(self, url: str, deadline: float) -> bytes:
        """The image's first HEAD_BYTES: a Range request, and a server that
        ignores Range is read no further than that. Empty if it cannot be read
        (the caller then downloads the whole image and checks that)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise delivery_failed("deadline passed while reading the image header", network=True)
        head = bytearray()
        try:
            resp = await self.wire.send("GET", url, headers={"range": f"bytes=0-{HEAD_BYTES - 1}"}, timeout=WireTimeout.of(min(remaining, 30.0)), stream=True)
            try:
                if resp.status_code not in (200, 206):
                    return b""
                async for chunk in resp.aiter_bytes():
                    head += chunk
                    if len(head) >= HEAD_BYTES:
                        break
            finally:
                await resp.aclose()
        except httpx.HTTPError:
            return b""
        return bytes(head[:HEAD_BYTES])

    async def _download(self, url: str | None, deadline: float) -> bytes:
        if not url:
            raise delivery_failed("returned an image with neither URL nor bytes")
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.partition(",")[2], validate=True)
            except ValueError:
                raise delivery_failed("returned a broken data: URI") from None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise delivery_failed("deadline passed while downloading the image", network=True)
        try:
            async with asyncio.timeout(remaining):  # the whole body, not each read
                return await self._stream(url, min(remaining, DOWNLOAD_TIMEOUT_S))
        except TimeoutError:
            raise delivery_failed("deadline passed while downloading the image", network=True) from None
        except httpx.TransportError as exc:
            raise delivery_failed(f"image download failed: {type(exc).__name__}", network=True) from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # a URL the client cannot use
            raise delivery_failed(f"image download failed: {type(exc).__name__}") from None

    async def _stream(self, url: str, timeout: float) -> bytes:
        resp = await self.wire.send("GET", url, headers={}, timeout=WireTimeout.of(timeout), stream=True)
        try:
            if resp.status_code != 200:
                raise delivery_failed(f"image download answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_OUTPUT_BYTES:
                raise delivery_failed("image is implausibly large")
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > MAX_OUTPUT_BYTES:
                    raise delivery_failed("image is implausibly large")
                chunks.append(chunk)
        finally:
            await resp.aclose()
        return b"".join(chunks)


HEAD_B64 = 64 * 1024  # 48 KB once decoded: a PNG/WebP header and most JPEG headers
HEAD_BYTES = 64 * 1024  # what a Range request reads of an image served by URL


@dataclass(frozen=True, slots=True)
class SizeCheck:
    """Whether a produced size is what `job` asked for (see `acceptable`)."""

    job: ImageJob
    tolerance: SizeTolerance = DEFAULT_TOLERANCE

    def __call__(self, size: tuple[int, int]) -> bool:
        return acceptable(size, self.job, self.tolerance)

    def require(self, size: tuple[int, int]) -> tuple[int, int]:
        """`size`, or a delivery failure naming it: a wrong size is never passed on."""
        if not self(size):
            raise delivery_failed(f"returned {size[0]}x{size[1]}, not the requested {self.job.width}x{self.job.height}")
        return size


def header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's first bytes, None if they do not say."""
    try:
        with Image.open(io.BytesIO(head)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - Pillow raises many types for a truncated or odd header
        return None


def pass_through(b64: str, wanted: str, job: ImageJob, head: bytes | None = None) -> bool:
    """True when the base64 may go to the caller as it came, at exactly the job's size."""
    return pass_through_size(b64, wanted, SizeCheck(job, SizeTolerance(ratio=0, pixels=0)), head) == (job.width, job.height)


def pass_through_size(b64: str, wanted: str, fits: SizeCheck, head: bytes | None = None) -> tuple[int, int] | None:
    """Its size when the base64's first 48 KB say it is the wanted type and a size that fits:
    the caller then gets the backend's string as it came, with no decode and
    no re-encode of the whole image (for a 1.5 MB image, most of the gateway's
    CPU per request). Only that head is checked to be valid base64. `head`: that
    head already decoded and checked by the adapter (`GeneratedImage.b64_head`),
    which spares decoding it twice (a few hundred microseconds for 64 KB)."""
    try:
        if head is None:
            head = base64.b64decode(b64[:HEAD_B64], validate=True)
        size = header_size(head) if sniff(head) == wanted else None
    except Exception:  # noqa: BLE001 - anything odd takes the full path
        return None
    return size if size is not None and fits(size) else None


def check_size(data: bytes, fits: SizeCheck) -> tuple[int, int]:
    """Read the header only; a wrong size is a provider failure, never passed on."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except Exception:  # noqa: BLE001 - Pillow raises many types for a broken image; each means the same to the caller
        raise delivery_failed("returned an image that cannot be read") from None
    return fits.require(size)


def transcode(data: bytes, fmt: str, compression: int | None, fits: SizeCheck) -> tuple[bytes, tuple[int, int]]:
    """Decode and re-encode in the requested format (runs in a worker thread)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = fits.require(im.size)
            rgb = im.convert("RGB")
            out = io.BytesIO()
            kwargs: dict[str, object] = {}
            if fmt in ("jpeg", "webp"):
                kwargs["quality"] = compression if compression is not None else 90
            rgb.save(out, PIL_FORMATS[fmt], **kwargs)
            return out.getvalue(), size
    except ProviderError:
        raise
    except Exception:  # noqa: BLE001 - Pillow raises many types for a broken image; each means the same to the caller
        raise delivery_failed("returned an image that cannot be decoded") from None
