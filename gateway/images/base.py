"""The image store's one interface: put bytes, get them back, hand out a URL.

A store keeps images the gateway serves itself (bytes from the local GPU or a
b64-only provider, transcoded images, re-hosted provider images) until they
expire. Every implementation answers the same three questions, so results.py
and the file route never know which one is configured. Names are chosen here
(`<expiry>-<random token>.<ext>`, so any process can tell an image's expiry and
age from its name alone, with no index to share) and are never taken from a
caller without the signature check and `valid_name`.

Beside images, a store keeps blobs: opaque bytes another part of the gateway
names and tracks itself (the uploaded files of /v1/files, gateway.files).
A blob's name also leads with its expiry (`<expiry>-<token>.blob`, made by
`new_blob_name`), so the sweep deletes expired blobs with no index; blobs live
apart from images (their own directory or key prefix), never count toward
`max_bytes` and are never evicted for room: their owner bounds them (a size
limit per file) and deletes them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from gateway.images.signing import UrlSigner

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {media: ext for ext, media in MEDIA_TYPES.items()}
_NAME = re.compile(r"^(\d{1,12})-[A-Za-z0-9_-]{22}\.(?:png|jpeg|webp)$")
_BLOB_NAME = re.compile(r"^(\d{1,12})-[A-Za-z0-9_-]{22}\.blob$")
BLOBS = "blobs"  # the directory (filesystem) or key prefix segment (s3) blobs live under
FILES_PATH = "/v1/images/files/"
log = logging.getLogger("klein.images")


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class StoredRef:
    """What `put` returns: the name under which the image lives, and its expiry (unix seconds)."""

    name: str
    expires_at: int


def new_name(content_type: str, expires_at: int) -> str:
    """The expiry, 16 random bytes (22 URL-safe characters) and the format's extension."""
    return f"{expires_at}-{secrets.token_urlsafe(16)}.{EXTENSIONS[content_type]}"


def valid_name(name: str) -> bool:
    """Only names `new_name` makes: no separators, no dots but the extension's."""
    return bool(_NAME.match(name))


def new_blob_name(expires_at: int) -> str:
    """A blob's name: its expiry and 16 random bytes, so the sweep can tell when it expires."""
    return f"{expires_at}-{secrets.token_urlsafe(16)}.blob"


def valid_blob_name(name: str) -> bool:
    return bool(_BLOB_NAME.match(name))


def expiry_of(name: str) -> int:
    """The expiry a valid name carries (unix seconds)."""
    return int(name.split("-", 1)[0])


def media_type_of(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[1]]


class ImageStore(ABC):
    """put / get / url. Subclasses store bytes; URLs default to the gateway's own signed ones.

    Stores shared between processes (filesystem, s3) keep no index; they
    override `sweep` to delete what expired and what is over the cap, and it
    runs in the background after a put, at most every `sweep_every_s` or once
    an eighth of the cap was written, so no caller waits on a listing."""

    kind = "abstract"

    def __init__(self, *, ttl_s: int, max_bytes: int, signer: UrlSigner, clock: Callable[[], float] = time.time, sweep_every_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.signer = signer
        self.clock = clock
        self.sweep_every_s = sweep_every_s
        self._last_sweep = clock()
        self._written_since_sweep = 0
        self._sweeping: asyncio.Task[None] | None = None
        self._sweep_again = False

    @abstractmethod
    async def put(self, data: bytes, content_type: str, *, keep_s: int | None = None) -> StoredRef:
        """Store the image until now + ttl_s, or now + keep_s where that is longer
        (an image a job or an idempotent answer refers to lives as long as that
        record); may evict the oldest to stay under max_bytes."""

    def expiry(self, keep_s: int | None = None) -> int:
        """When an image put now expires (unix seconds): never sooner than ttl_s."""
        return int(self.clock()) + max(self.ttl_s, keep_s or 0)

    @abstractmethod
    async def get(self, name: str) -> StoredImage | None:
        """The image, or None when it is unknown, expired or evicted."""

    @abstractmethod
    async def put_blob(self, name: str, data: bytes) -> None:
        """Store opaque bytes under a name from `new_blob_name` until the expiry it carries."""

    @abstractmethod
    async def get_blob(self, name: str) -> bytes | None:
        """The blob's bytes, or None when it is unknown, expired or deleted."""

    @abstractmethod
    async def delete_blob(self, name: str) -> None:
        """Delete the blob; deleting one that is not there is not an error."""

    def _check_blob(self, name: str) -> None:
        if not valid_blob_name(name):
            raise ValueError("blob names come from new_blob_name")

    async def url(self, ref: StoredRef, base_url: str) -> str:
        """Where the caller fetches it: the gateway's signed, expiring file URL."""
        return base_url + self.signer.path_for(ref.name, ref.expires_at)

    async def sweep(self) -> int:
        """Delete expired images, then the oldest until under the cap (the newest always stays); how many went."""
        return 0

    async def idle(self) -> None:
        """Wait for a background sweep, if one runs."""
        if self._sweeping is not None:
            await asyncio.gather(self._sweeping, return_exceptions=True)

    async def close(self) -> None:
        await self.idle()

    def expired(self, expires_at: float) -> bool:
        return expires_at < self.clock()

    def _wrote(self, size: int) -> None:
        """After a put: sweep in the background when one is due (once more, if one is running)."""
        self._written_since_sweep += size
        if self._written_since_sweep < self.max_bytes // 8 and self.clock() - self._last_sweep < self.sweep_every_s:
            return
        self._last_sweep = self.clock()
        self._written_since_sweep = 0
        if self._sweeping is not None and not self._sweeping.done():
            self._sweep_again = True
        else:
            self._sweeping = asyncio.ensure_future(self._sweep_logged())

    async def _sweep_logged(self) -> None:
        while True:
            self._sweep_again = False
            try:
                removed = await self.sweep()
            except Exception as exc:  # noqa: BLE001 - a failed sweep must not fail requests; the next one retries
                log.warning("image store sweep failed: %s", type(exc).__name__)
                return
            if removed:
                log.debug("image store sweep removed %d image(s)", removed)
            if not self._sweep_again:
                return
