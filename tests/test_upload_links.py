"""Uploads lent a short-lived signed URL for backends that take URLs only."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.config import GatewaySettings
from gateway.image_store import ImageStore
from gateway.job import ImageJob, JobKind, ReferenceImage
from gateway.upload_links import UploadLinks, reference_url_for
from tests.gateway_support import png_bytes

NOW = 1_800_000_000.0
UPLOAD = ReferenceImage(content_type="image/png", data=png_bytes(64, 64), width=64, height=64)
CALLER_URL = ReferenceImage(content_type="application/octet-stream", url="https://images.example.com/cat.png")


def store(ttl_s: int = 3600) -> ImageStore:
    return ImageStore(ttl_s=ttl_s, max_bytes=10_000_000, signing_key=b"k" * 32, clock=lambda: NOW)


def parts(url: str) -> tuple[str, int, str]:
    split = urlsplit(url)
    query = parse_qs(split.query)
    return split.path.rsplit("/", 1)[1].rsplit(".", 1)[0], int(query["expires"][0]), query["sig"][0]


@pytest.mark.parametrize("ttl_s,store_ttl_s,expires_in", [(300, 3600, 300), (60, 3600, 60), (300, 120, 120)])
def test_a_lent_url_expires_at_the_shorter_of_its_ttl_and_the_stores(ttl_s: int, store_ttl_s: int, expires_in: int) -> None:
    s = store(store_ttl_s)
    url = reference_url_for(s, "https://gw.example.com/", UPLOAD, ttl_s, clock=lambda: NOW)
    assert url.startswith("https://gw.example.com/v1/images/files/") and ".png?" in url
    image_id, expires, sig = parts(url)
    assert expires == int(NOW) + expires_in
    assert s.get(image_id, expires, sig).data == UPLOAD.data
    assert s.get(image_id, expires + 3600, sig) is None  # the expiry is signed: it cannot be stretched


def test_a_lent_url_stops_working_once_it_expires() -> None:
    clock = [NOW]
    s = ImageStore(ttl_s=3600, max_bytes=10_000_000, clock=lambda: clock[0])
    image_id, expires, sig = parts(reference_url_for(s, "https://gw.example.com", UPLOAD, 300, clock=lambda: clock[0]))
    clock[0] = NOW + 299
    assert s.get(image_id, expires, sig) is not None
    clock[0] = NOW + 301
    assert s.get(image_id, expires, sig) is None


def test_lend_gives_uploads_a_url_and_keeps_caller_urls_as_they_came() -> None:
    settings = GatewaySettings(public_base_url="https://gw.example.com", reference_url_ttl_s=120)
    links = UploadLinks(store(), settings, clock=lambda: NOW)
    job = ImageJob(kind=JobKind.EDIT, prompt="p", width=1024, height=1024, references=(UPLOAD, CALLER_URL))
    lent = links.lend(job)
    assert lent.references[1] == CALLER_URL
    upload = lent.references[0]
    assert upload.data == UPLOAD.data and upload.url is not None and upload.url.startswith("https://gw.example.com/v1/images/files/")
    assert parts(upload.url)[1] == int(NOW) + 120
    assert job.references[0].url is None  # the caller's job is untouched; other backends still get bytes


def test_without_a_public_base_url_nothing_is_lent() -> None:
    links = UploadLinks(store(), GatewaySettings())
    assert not links.available
    with pytest.raises(RuntimeError):
        links.lend(ImageJob(kind=JobKind.EDIT, prompt="p", width=1024, height=1024, references=(UPLOAD,)))
