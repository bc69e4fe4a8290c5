"""Images the gateway serves itself, behind signed, expiring URLs.

Used when a backend returned bytes (the local GPU, b64-only providers) or the
gateway had to transcode, and the caller asked for a URL. Memory-bounded (LRU
by bytes) and time-bounded (TTL); a URL is valid only with its HMAC signature
and before its expiry, so ids cannot be guessed or replayed forever.

The store is per process: behind several replicas, send a caller back to the
replica that answered, or ask for b64_json.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_at: float


class ImageStore:
    def __init__(self, *, ttl_s: int, max_bytes: int, signing_key: bytes | None = None, clock=time.time) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._key = signing_key or secrets.token_bytes(32)
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, content_type: str) -> tuple[str, int]:
        """Store the image; returns (id, expiry as unix seconds)."""
        self._evict()
        image_id = secrets.token_urlsafe(16)
        expires = int(self._clock()) + self.ttl_s
        self._items[image_id] = StoredImage(data, content_type, expires)
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._drop_oldest()
        return image_id, expires

    def signature(self, image_id: str, expires: int) -> str:
        msg = f"{image_id}.{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def path_for(self, image_id: str, expires: int, ext: str) -> str:
        return f"/v1/images/files/{image_id}.{ext}?expires={expires}&sig={self.signature(image_id, expires)}"

    def get(self, image_id: str, expires: int, sig: str) -> StoredImage | None:
        """The image, or None if the signature is wrong, it expired, or it was evicted."""
        if not hmac.compare_digest(self.signature(image_id, expires).encode(), sig.encode("utf-8", "replace")):  # bytes: str must be ASCII
            return None
        if expires < self._clock():
            return None
        item = self._items.get(image_id)
        if item is None or item.expires_at < self._clock():
            return None
        return item

    def _drop_oldest(self) -> None:
        _, item = self._items.popitem(last=False)
        self._bytes -= len(item.data)

    def _evict(self) -> None:
        now = self._clock()
        while self._items:
            first = next(iter(self._items.values()))
            if first.expires_at >= now:
                break
            self._drop_oldest()
