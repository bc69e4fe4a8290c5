"""Uploads lent a short-lived signed URL for backends that take URLs only."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.config import GatewaySettings
from gateway.dispatch.upload_links import UploadLinks, reference_url_for
from gateway.domain.job import ImageJob, JobKind, ReferenceImage
from gateway.images.memory import MemoryImageStore
from gateway.images.signing import UrlSigner
from tests.gateway_support import png_bytes

NOW = 1_800_000_000.0
UPLOAD = ReferenceImage(content_type="image/png", data=png_bytes(64, 64), width=64, height=64)
CALLER_URL = ReferenceImage(content_type="application/octet-stream", url="https://images.example.com/cat.png")


def store(ttl_s: int = 3600, clock: list[float] | None = None) -> MemoryImageStore:
    now = clock or [NOW]
    return MemoryImageStore(ttl_s=ttl_s, max_bytes=10_000_000, signer=UrlSigner(b"k" * 32), clock=lambda: now[0])


def parts(url: str) -> tuple[str, int, str]:
    split = urlsplit(url)
    query = parse_qs(split.query)
    return split.path.rsplit("/", 1)[1], int(query["expires"][0]), query["sig"][0]


def served(s: MemoryImageStore, name: str, expires: int, sig: str) -> bool:
    """What `/v1/images/files/{name}` checks before it answers: the signature over the expiry, and the expiry."""
    return s.signer.verify(name, expires, sig) and not s.expired(expires)


@pytest.mark.parametrize("ttl_s,store_ttl_s,expires_in", [(300, 3600, 300), (60, 3600, 60), (300, 120, 120)])
async def test_a_lent_url_expires_at_the_shorter_of_its_ttl_and_the_stores(ttl_s: int, store_ttl_s: int, expires_in: int) -> None:
    s = store(store_ttl_s)
    url = await reference_url_for(s, "https://gw.example.com/", UPLOAD, ttl_s, clock=lambda: NOW)
    assert url.startswith("https://gw.example.com/v1/images/files/") and ".png?" in url
    name, expires, sig = parts(url)
    assert expires == int(NOW) + expires_in
    assert served(s, name, expires, sig)
    got = await s.get(name)
    assert got is not None and got.data == UPLOAD.data
    assert not served(s, name, expires + 3600, sig)  # the expiry is signed: it cannot be stretched


async def test_a_lent_url_stops_working_once_it_expires() -> None:
    clock = [NOW]
    s = store(3600, clock)
    name, expires, sig = parts(await reference_url_for(s, "https://gw.example.com", UPLOAD, 300, clock=lambda: clock[0]))
    clock[0] = NOW + 299
    assert served(s, name, expires, sig)
    clock[0] = NOW + 301
    assert not served(s, name, expires, sig)


async def test_lend_gives_uploads_a_url_and_keeps_caller_urls_as_they_came() -> None:
    settings = GatewaySettings(public_base_url="https://gw.example.com", reference_url_ttl_s=120)
    links = UploadLinks(store(), settings, clock=lambda: NOW)
    job = ImageJob(kind=JobKind.EDIT, prompt="p", width=1024, height=1024, references=(UPLOAD, CALLER_URL))
    lent = await links.lend(job)
    assert lent.references[1] == CALLER_URL
    upload = lent.references[0]
    assert upload.data == UPLOAD.data and upload.url is not None and upload.url.startswith("https://gw.example.com/v1/images/files/")
    assert parts(upload.url)[1] == int(NOW) + 120
    assert job.references[0].url is None  # the caller's job is untouched; other backends still get bytes


async def test_without_a_public_base_url_or_a_presigning_store_nothing_is_lent() -> None:
    links = UploadLinks(store(), GatewaySettings())
    assert not links.available
    with pytest.raises(RuntimeError):
        await links.lend(ImageJob(kind=JobKind.EDIT, prompt="p", width=1024, height=1024, references=(UPLOAD,)))


async def test_a_presigning_store_lends_its_own_urls_without_a_public_base_url() -> None:
    class Presigning(MemoryImageStore):
        url_mode = "presigned"

        async def url(self, ref, base_url):  # type: ignore[no-untyped-def]
            return f"https://bucket.example.com/{ref.name}?X-Amz-Expires={ref.expires_at - int(NOW)}"

    links = UploadLinks(Presigning(ttl_s=3600, max_bytes=10_000_000, signer=UrlSigner(b"k" * 32), clock=lambda: NOW), GatewaySettings(reference_url_ttl_s=120), clock=lambda: NOW)
    assert links.available
    lent = await links.lend(ImageJob(kind=JobKind.EDIT, prompt="p", width=1024, height=1024, references=(UPLOAD,)))
    assert lent.references[0].url is not None and lent.references[0].url.startswith("https://bucket.example.com/")
    assert lent.references[0].url.endswith("X-Amz-Expires=120")  # minutes, not the store's hour
