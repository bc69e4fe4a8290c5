"""Short-lived URLs for uploaded references, for backends that take URLs only.

EmpirioLabs takes reference images as URLs and nothing else
(docs/providers/empiriolabs.md#capabilities). When a caller uploads bytes, the
gateway can still route the edit there by keeping the bytes in its image
store and handing the provider a signed URL that expires within minutes.
That needs somewhere the provider can reach: a configured public base URL
(`gateway.public_base_url` or `KLEIN_PUBLIC_BASE_URL`), or an s3 image store
with `url_mode: presigned`, whose own presigned URLs the provider fetches from
the bucket. Without either the backend stays ineligible and the quote says why.

Only the image store's `put` and `url` are used, in `reference_url_for`: the
store decides whether the URL is the gateway's signed one or its own presigned one.
The URLs are never logged, listed or returned to the caller: they travel only
in the request to the one provider that needs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from gateway.config import GatewaySettings
from gateway.domain.job import ImageJob, ReferenceImage
from gateway.images import ImageStore
from gateway.images.base import StoredRef

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


async def reference_url_for(store: ImageStore, base_url: str, upload: ReferenceImage, ttl_s: int, clock: Callable[[], float] = time.time) -> str:
    """A URL serving `upload`'s bytes, valid for at most `ttl_s` seconds.
    The expiry is signed into the URL (or the presigned URL's lifetime), so it
    stops working at the shorter of `ttl_s` and the store's own lifetime for the bytes."""
    if upload.data is None:
        raise ValueError("only uploaded references (with bytes) need a lent URL")
    stored = await store.put(upload.data, upload.content_type)
    short = StoredRef(stored.name, min(stored.expires_at, int(clock()) + ttl_s))
    return await store.url(short, base_url.rstrip("/"))


class UploadLinks:
    """Lends uploads a URL when the gateway has a public address to lend it from."""

    def __init__(self, store: ImageStore, settings: GatewaySettings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings  # read at each call: the public base URL may be set after start-up
        self.clock = clock

    @property
    def available(self) -> bool:
        return bool(self.settings.public_base_url) or self.presigns

    @property
    def presigns(self) -> bool:
        return getattr(self.store, "url_mode", "gateway") == "presigned"

    async def lend(self, job: ImageJob) -> ImageJob:
        """The job with every upload given a URL (the bytes are kept for size checks)."""
        base = self.settings.public_base_url or ""
        if not base and not self.presigns:
            raise RuntimeError("no public base URL and no presigning store: uploads cannot be lent a URL")
        ttl = min(self.settings.reference_url_ttl_s, self.settings.image_url_ttl_s)
        refs = [ref if ref.url is not None else replace(ref, url=await reference_url_for(self.store, base, ref, ttl, self.clock)) for ref in job.references]
        return replace(job, references=tuple(refs))
