"""Signed, expiring URLs for the images the gateway serves itself.

The URL is the credential: `/v1/images/files/<name>?expires=<unix s>&sig=<hmac>`.
The HMAC covers the name and the expiry, so neither can be changed or extended.
Every worker and replica that may answer the fetch must hold the same key
(`KLEIN_URL_SIGNING_KEY`; see gateway.images.open_image_store for the default).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SIG_HEX_CHARS = 32  # 128 bits of HMAC-SHA256


class UrlSigner:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def signature(self, name: str, expires: int) -> str:
        msg = f"{name}.{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:SIG_HEX_CHARS]

    def path_for(self, name: str, expires: int) -> str:
        return f"/v1/images/files/{name}?expires={expires}&sig={self.signature(name, expires)}"

    def verify(self, name: str, expires: int, sig: str) -> bool:
        """Constant-time, on bytes: a `sig` that is not ASCII is simply wrong, never an error."""
        try:
            given = sig.encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(self.signature(name, expires).encode("ascii"), given)
