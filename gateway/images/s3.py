"""Any S3-compatible object store: AWS S3, Cloudflare R2, MinIO, GCS (interoperability).

Through obstore: one Rust-backed wheel with native asyncio calls and request
signing built in (presigned URLs without a second SDK), and none of botocore's
weight or its version coupling to boto3. Each image is one object under
`prefix`, with its Content-Type; its expiry leads its name (gateway.images.base),
so neither `get` nor the sweep needs an index or a HEAD per object.

URLs are either the gateway's own signed ones (`url_mode: gateway`: fetches go
through the gateway, the bucket stays private to it) or the store's presigned
GET URLs (`url_mode: presigned`: the caller downloads straight from the store,
valid for the image's remaining lifetime). The background sweep deletes
expired objects and then the oldest until the prefix is under `max_bytes`
(one listing of the prefix each time); a bucket lifecycle rule on the prefix
(expire after one day) is the backstop for objects a sweep never saw.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Literal

import obstore
from obstore.store import S3Store

from gateway.images.base import BLOBS, ImageStore, StoredImage, StoredRef, expiry_of, media_type_of, new_name, valid_blob_name, valid_name
from gateway.settings import Settings

UrlMode = Literal["gateway", "presigned"]


def open_bucket(bucket: str, *, endpoint_url: str | None, region: str | None, env: Mapping[str, str]) -> S3Store:
    """An obstore S3Store with credentials from the standard AWS variables."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint"] = endpoint_url
        options["virtual_hosted_style_request"] = False  # MinIO, moto and most S3-compatibles want path style
    aws = Settings.from_env(env)
    for key, value in (("access_key_id", aws.aws_access_key_id), ("secret_access_key", aws.aws_secret_access_key), ("session_token", aws.aws_session_token)):
        if value:
            options[key] = value
    options["region"] = region or aws.aws_region or aws.aws_default_region or "us-east-1"
    client_options: Any = {"allow_http": True} if endpoint_url and endpoint_url.startswith("http://") else None
    return S3Store(bucket, client_options=client_options, **options)


class S3ImageStore(ImageStore):
    kind = "s3"

    def __init__(self, bucket: S3Store, *, prefix: str = "klein/images/", url_mode: UrlMode = "gateway", **kw: Any) -> None:
        super().__init__(**kw)
        self.bucket = bucket
        self.prefix = prefix
        self.url_mode = url_mode

    def _key(self, name: str) -> str:
        return self.prefix + name

    async def put(self, data: bytes, content_type: str, *, keep_s: int | None = None) -> StoredRef:
        expires = self.expiry(keep_s)
        name = new_name(content_type, expires)
        attributes = {"Content-Type": content_type, "Cache-Control": f"private, max-age={expires - int(self.clock())}"}
        await obstore.put_async(self.bucket, self._key(name), data, attributes=attributes)
        self._wrote(len(data))
        return StoredRef(name, expires)

    async def get(self, name: str) -> StoredImage | None:
        if not valid_name(name) or self.expired(expiry_of(name)):
            return None
        try:
            result = await obstore.get_async(self.bucket, self._key(name))
        except FileNotFoundError:
            return None
        data = bytes(await result.bytes_async())
        return StoredImage(data, str(result.attributes.get("Content-Type") or media_type_of(name)), expiry_of(name))

    def _blob_key(self, name: str) -> str:
        return f"{self.prefix}{BLOBS}/{name}"

    async def put_blob(self, name: str, data: bytes) -> None:
        self._check_blob(name)
        await obstore.put_async(self.bucket, self._blob_key(name), data, attributes={"Content-Type": "application/octet-stream"})
        self._wrote(0)  # a chance to sweep expired blobs; they take no room under the image cap

    async def get_blob(self, name: str) -> bytes | None:
        if not valid_blob_name(name) or self.expired(expiry_of(name)):
            return None
        try:
            result = await obstore.get_async(self.bucket, self._blob_key(name))
        except FileNotFoundError:
            return None
        return bytes(await result.bytes_async())

    async def delete_blob(self, name: str) -> None:
        if valid_blob_name(name):
            await obstore.delete_async(self.bucket, self._blob_key(name))

    async def url(self, ref: StoredRef, base_url: str) -> str:
        if self.url_mode == "gateway":
            return await super().url(ref, base_url)
        lifetime = max(1, ref.expires_at - int(self.clock()))
        return await obstore.sign_async(self.bucket, "GET", self._key(ref.name), datetime.timedelta(seconds=lifetime))

    async def sweep(self) -> int:
        now = self.clock()
        live: list[tuple[int, float, int, str]] = []  # expiry, write time, size, key: oldest first
        doomed: list[str] = []
        async for batch in obstore.list(self.bucket, self.prefix):
            for meta in batch:
                path = meta["path"]
                name = path[len(self.prefix) :]
                if name.startswith(BLOBS + "/"):  # a blob: deleted once expired, never counted toward the cap
                    blob = name[len(BLOBS) + 1 :]
                    if valid_blob_name(blob) and expiry_of(blob) < now:
                        doomed.append(path)
                    continue
                if not valid_name(name):
                    continue
                expires = expiry_of(name)
                if expires < now:
                    doomed.append(path)
                else:
                    live.append((expires, meta["last_modified"].timestamp(), meta["size"], path))
        live.sort()
        total = sum(size for _, _, size, _ in live)
        for _, _, size, path in live[:-1]:  # the newest image always stays
            if total <= self.max_bytes:
                break
            doomed.append(path)
            total -= size
        if doomed:
            await obstore.delete_async(self.bucket, doomed)
        return len(doomed)
