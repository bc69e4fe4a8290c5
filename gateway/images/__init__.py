"""Where the images the gateway serves itself live: memory, a directory, or S3.

`open_image_store` picks the store from providers.yaml (`gateway.image_store`)
and the environment, and the URL signing key with it:

- `KLEIN_URL_SIGNING_KEY` set: that key, whatever the store (set it on every
  replica when they share a filesystem volume or a bucket).
- memory: a random key per process (nothing else can serve its images anyway).
- filesystem: a key kept in the directory itself (`.signing-key`, mode 0600),
  made by the first process, so every worker and replica sharing the directory
  signs alike and URLs survive restarts.
- s3 with `url_mode: gateway`: refused without `KLEIN_URL_SIGNING_KEY`, since
  replicas have nothing else to agree on. `presigned` needs no key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from gateway.config import GatewaySettings
from gateway.domain.errors import ConfigError
from gateway.images.base import FILES_PATH, ImageStore, StoredImage, StoredRef, valid_name
from gateway.images.signing import UrlSigner
from gateway.settings import Settings

__all__ = ["FILES_PATH", "ImageStore", "ImageStoreError", "StoredImage", "StoredRef", "UrlSigner", "open_image_store", "store_kind", "valid_name"]


class ImageStoreError(ConfigError):
    """The image store cannot be opened as configured; the message says what to set."""


def store_kind(settings: GatewaySettings, env: Mapping[str, str], workers: int) -> str:
    kind = Settings.from_env(env).image_store or settings.image_store.kind
    if kind == "auto":
        kind = "filesystem" if workers > 1 else "memory"
    if kind not in ("memory", "filesystem", "s3"):
        raise ImageStoreError(f"KLEIN_IMAGE_STORE: {kind!r} is not one of memory, filesystem, s3")
    if kind == "memory" and workers > 1:
        raise ImageStoreError(
            f"gateway.image_store.kind: memory cannot serve {workers} workers (a URL fetched from another worker answers 404); use filesystem (the default with several workers) or s3"
        )
    return kind


def open_image_store(settings: GatewaySettings, env: Mapping[str, str] | None = None, *, workers: int | None = None) -> ImageStore:
    env = os.environ if env is None else env
    environment = Settings.from_env(env)
    workers = workers if workers is not None else int(environment.workers or 1)
    cfg = settings.image_store
    kind = store_kind(settings, env, workers)
    url_mode = environment.image_url_mode or cfg.url_mode
    if url_mode not in ("gateway", "presigned"):
        raise ImageStoreError(f"KLEIN_IMAGE_URL_MODE: {url_mode!r} is not one of gateway, presigned")
    if url_mode == "presigned" and kind != "s3":
        raise ImageStoreError(f"gateway.image_store.url_mode: presigned needs the s3 store, not {kind}")
    key = (environment.url_signing_key or "").encode() or None
    common = {"ttl_s": settings.image_url_ttl_s, "max_bytes": settings.image_store_bytes}
    if kind == "memory":
        from gateway.images.memory import MemoryImageStore

        return MemoryImageStore(signer=UrlSigner(key), **common)
    if kind == "filesystem":
        from gateway.images.filesystem import FilesystemImageStore, shared_signing_key

        root = environment.image_dir or cfg.path
        if not root:
            raise ImageStoreError("gateway.image_store.path: the filesystem store needs a directory (or set KLEIN_IMAGE_DIR)")
        try:
            signer = UrlSigner(key or shared_signing_key(root))
        except OSError as exc:
            raise ImageStoreError(f"gateway.image_store.path: cannot use {root}: {exc.strerror or exc}") from None
        return FilesystemImageStore(root, signer=signer, sweep_every_s=cfg.sweep_every_s, **common)
    from gateway.images.s3 import S3ImageStore, open_bucket

    bucket = environment.s3_bucket or cfg.s3.bucket
    if not bucket:
        raise ImageStoreError("gateway.image_store.s3.bucket: the s3 store needs a bucket (or set KLEIN_S3_BUCKET)")
    if url_mode == "gateway" and key is None:
        raise ImageStoreError("KLEIN_URL_SIGNING_KEY: the s3 store with url_mode gateway needs a signing key shared by every replica")
    store = open_bucket(bucket, endpoint_url=environment.s3_endpoint or cfg.s3.endpoint_url, region=environment.s3_region or cfg.s3.region, env=env)
    prefix = environment.s3_prefix or cfg.s3.prefix
    return S3ImageStore(store, prefix=prefix, url_mode=url_mode, sweep_every_s=cfg.sweep_every_s, signer=UrlSigner(key), **common)  # type: ignore[arg-type]
