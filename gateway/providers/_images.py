"""Images on the wire: reference images out, generated images back.

Hosted providers take a reference as a public URL or an inline `data:` URI,
and may return outputs either way (fal's `sync_mode` answers with data URIs,
docs/providers/fal.md#request-body). These helpers keep that translation in one place.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
from urllib.parse import unquote_to_bytes, urlsplit

from gateway.domain.job import ReferenceImage
from gateway.providers.base import GeneratedImage


def is_data_uri(value: str) -> bool:
    return value[:5].lower() == "data:"


def parse_data_uri(uri: str) -> tuple[str | None, bytes]:
    """(media type or None, bytes) of a `data:` URI (RFC 2397); ValueError if malformed."""
    if not is_data_uri(uri):
        raise ValueError("not a data: URI")
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ValueError("data: URI has no payload")
    params = header.split(";")
    media_type = params[0].strip().lower() or None
    if any(p.strip().lower() == "base64" for p in params[1:]):
        try:
            return media_type, base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data: URI is not valid base64") from None
    return media_type, unquote_to_bytes(payload)


HEAD_B64_CHARS = 64 * 1024  # 48 KB once decoded: every PNG/WebP header and most JPEG headers


def checked_b64(value: str) -> tuple[str, bytes]:
    """(base64, its first decoded bytes) of a provider's base64 image, not decoded whole.

    The string is kept as it came so that a caller who wants `b64_json` gets it
    untouched, with no decode and re-encode of a megabyte-sized image; only
    its head is checked to be base64 (and read to sniff the image type).
    Base64 wrapped across lines is unwrapped first. ValueError if not base64."""
    try:
        return value, base64.b64decode(value[:HEAD_B64_CHARS], validate=True)
    except (binascii.Error, ValueError):
        unwrapped = "".join(value.split())
        if unwrapped == value:
            raise ValueError("not valid base64") from None
    try:
        return unwrapped, base64.b64decode(unwrapped[:HEAD_B64_CHARS], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def data_uri_b64(uri: str) -> tuple[str | None, str] | None:
    """(media type or None, checked base64) of a base64 `data:` URI, None for any other
    data: URI (percent-encoded); ValueError if malformed."""
    if not is_data_uri(uri):
        raise ValueError("not a data: URI")
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ValueError("data: URI has no payload")
    params = header.split(";")
    if not any(p.strip().lower() == "base64" for p in params[1:]):
        return None
    try:
        b64, _ = checked_b64(payload)
    except ValueError:
        raise ValueError("data: URI is not valid base64") from None
    return params[0].strip().lower() or None, b64


def reference_uri(ref: ReferenceImage) -> str:
    """What a hosted provider gets for a reference: the caller's URL, else a data: URI of the bytes."""
    return ref.url if ref.url else ref.data_uri()


def content_type_from_url(url: str) -> str | None:
    """The media type a URL's file extension implies (`.../out-0.webp` -> image/webp), if any."""
    guessed, _ = mimetypes.guess_type(urlsplit(url).path)
    return guessed if guessed and guessed.startswith("image/") else None


def output_image(
    uri: str,
    *,
    content_type: str | None = None,
    width: int | None = None,
    height: int | None = None,
    nsfw: bool | None = None,
    seed: int | None = None,
) -> GeneratedImage:
    """A GeneratedImage from a provider's output URI. An inline base64 data: URI keeps
    its base64 (`b64`, passed through to a `b64_json` caller); other data: URIs become bytes.

    Raises ValueError for a malformed data: URI (the caller decides what that means)."""
    if is_data_uri(uri):
        inline = data_uri_b64(uri)
        if inline is not None:
            return GeneratedImage(b64=inline[1], content_type=inline[0] or content_type, width=width, height=height, nsfw=nsfw, seed=seed)
        media_type, data = parse_data_uri(uri)
        return GeneratedImage(data=data, content_type=media_type or content_type, width=width, height=height, nsfw=nsfw, seed=seed)
    return GeneratedImage(url=uri, content_type=content_type, width=width, height=height, nsfw=nsfw, seed=seed)
