"""Short-lived URLs for uploaded references, for backends that take URLs only.

EmpirioLabs takes reference images as URLs and nothing else
(docs/providers/empiriolabs.md#capabilities). When a caller uploads bytes, the
gateway can still route the edit there by keeping the bytes in its image
store and handing the provider a signed URL that expires within minutes.
That needs somewhere the provider can reach: a configured public base URL
(`gateway.public_base_url` or `KLEIN_PUBLIC_BASE_URL`). Without one the
backend stays ineligible and the quote says why.

Only `put` and `path_for` of the image store are used, in `reference_url_for`,
so a different store (one that presigns its own URLs) changes one function.
The URLs are never logged, listed or returned to the caller: they travel only
in the request to the one provider that needs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from gateway.config import GatewaySettings
from gateway.image_store import ImageStore
from gateway.job import ImageJob, ReferenceImage

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def reference_url_for(store: ImageStore, base_url: str, upload: ReferenceImage, ttl_s: int, clock: Callable[[], float] = time.time) -> str:
    """A signed URL serving `upload`'s bytes, valid for at most `ttl_s` seconds.

    The signature covers the expiry, so the URL stops working at the shorter
    of `ttl_s` and the store's own lifetime for the bytes."""
    if upload.data is None:
        raise ValueError("only uploaded references (with bytes) need a lent URL")
    image_id, stored_until = store.put(upload.data, upload.content_type)
    expires = min(stored_until, int(clock()) + ttl_s)
    return base_url.rstrip("/") + store.path_for(image_id, expires, EXTENSIONS.get(upload.content_type, "png"))


class UploadLinks:
    """Lends uploads a URL when the gateway has a public address to lend it from."""

    def __init__(self, store: ImageStore, settings: GatewaySettings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings  # read at each call: the public base URL may be set after start-up
        self.clock = clock

    @property
    def available(self) -> bool:
        return bool(self.settings.public_base_url)

    def lend(self, job: ImageJob) -> ImageJob:
        """The job with every upload given a URL (the bytes are kept for size checks)."""
        base = self.settings.public_base_url
        if not base:
            raise RuntimeError("no public base URL: uploads cannot be lent a URL")
        ttl = min(self.settings.reference_url_ttl_s, self.settings.image_url_ttl_s)
        refs = tuple(ref if ref.url is not None else replace(ref, url=reference_url_for(self.store, base, ref, ttl, self.clock)) for ref in job.references)
        return replace(job, references=refs)
