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

from gateway.job import ReferenceImage
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
    """A GeneratedImage from a provider's output URI; inline data: URIs become bytes.

    Raises ValueError for a malformed data: URI (the caller decides what that means)."""
    if is_data_uri(uri):
        media_type, data = parse_data_uri(uri)
        return GeneratedImage(data=data, content_type=media_type or content_type, width=width, height=height, nsfw=nsfw, seed=seed)
    return GeneratedImage(url=uri, content_type=content_type, width=width, height=height, nsfw=nsfw, seed=seed)
