"""One process's memory: LRU by bytes, bounded by TTL.

The default for a single worker. Refused when several workers or replicas
serve one address, because a fetch that lands on another process finds nothing
(gateway.images.open_image_store says so at start-up).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from gateway.images.base import ImageStore, StoredImage, StoredRef, expiry_of, new_name


class MemoryImageStore(ImageStore):
    kind = "memory"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._blobs: dict[str, bytes] = {}  # apart from images: never evicted for room, dropped once expired

    async def put(self, data: bytes, content_type: str, *, keep_s: int | None = None) -> StoredRef:
        self._evict_expired()
        expires = self.expiry(keep_s)
        name = new_name(content_type, expires)
        self._items[name] = StoredImage(data, content_type, expires)
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._drop_oldest()
        return StoredRef(name, expires)

    async def get(self, name: str) -> StoredImage | None:
        item = self._items.get(name)
        if item is None or self.expired(item.expires_at):
            return None
        return item

    async def put_blob(self, name: str, data: bytes) -> None:
        self._check_blob(name)
        await self.sweep()
        self._blobs[name] = bytes(data)

    async def get_blob(self, name: str) -> bytes | None:
        data = self._blobs.get(name)
        if data is None or self.expired(expiry_of(name)):
            return None
        return data

    async def delete_blob(self, name: str) -> None:
        self._blobs.pop(name, None)

    async def sweep(self) -> int:
        """Expired blobs (images expire as they are put, oldest first)."""
        gone = [n for n in self._blobs if self.expired(expiry_of(n))]
        for name in gone:
            del self._blobs[name]
        return len(gone)

    def _drop_oldest(self) -> None:
        _, item = self._items.popitem(last=False)
        self._bytes -= len(item.data)

    def _evict_expired(self) -> None:
        # Oldest first, stopping at the first live one: an image kept longer
        # (keep_s) can shield shorter-lived ones behind it, which `get` still
        # refuses and the byte cap still evicts.
        while self._items:
            first = next(iter(self._items.values()))
            if not self.expired(first.expires_at):
                break
            self._drop_oldest()
