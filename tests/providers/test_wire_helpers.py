"""The shared wire helpers: which URLs may carry a credential, redaction, data: URIs."""

from __future__ import annotations

import base64

import pytest

from gateway.domain.job import ReferenceImage
from gateway.providers._images import content_type_from_url, output_image, parse_data_uri, reference_uri
from gateway.providers._wire import provider_text, same_origin, trusted_url

from .conftest import PNG_BYTES


@pytest.mark.parametrize(
    ("url", "base", "same"),
    [
        ("https://queue.fal.run/fal-ai/flux-2/requests/1/status", "https://queue.fal.run", True),
        ("https://QUEUE.fal.run:443/x", "https://queue.fal.run/", True),
        ("http://127.0.0.1:8080/fal/x", "http://127.0.0.1:8080/fal", True),
        ("http://127.0.0.1:8080/falx/x", "http://127.0.0.1:8080/fal", False),  # outside the base path
        ("http://127.0.0.1:8081/fal/x", "http://127.0.0.1:8080/fal", False),
        ("http://queue.fal.run/x", "https://queue.fal.run", False),
        ("https://queue.fal.run.evil.test/x", "https://queue.fal.run", False),
        ("https://user:pw@queue.fal.run/x", "https://queue.fal.run", False),
        ("/relative/path", "https://queue.fal.run", False),
        ("https://queue.fal.run:notaport/x", "https://queue.fal.run", False),
    ],
)
def test_same_origin(url, base, same):
    assert same_origin(url, base) is same


@pytest.mark.parametrize("candidate", [None, "", 42, {"get": "x"}, "https://evil.test/x"])
def test_trusted_url_falls_back_for_anything_not_under_the_base(candidate):
    assert trusted_url(candidate, "https://api.replicate.com", "https://api.replicate.com/v1/predictions/p") == "https://api.replicate.com/v1/predictions/p"


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        ("bad key abc123:def456 sent", "abc123:def456", "bad key [REDACTED] sent"),
        ("key id abc123 unknown", "abc123:def456", "key id [REDACTED] unknown"),
        ("nothing to hide", "r8_token", "nothing to hide"),
        ("no secret configured", None, "no secret configured"),
    ],
)
def test_provider_text_masks_the_credential_and_its_parts(text, secret, expected):
    assert provider_text(text, secret) == expected


@pytest.mark.parametrize(
    ("uri", "media_type", "data"),
    [
        ("data:image/png;base64," + base64.b64encode(PNG_BYTES).decode(), "image/png", PNG_BYTES),
        ("data:image/png;base64,\n" + base64.b64encode(b"abc").decode(), "image/png", b"abc"),
        ("data:,hello%20world", None, b"hello world"),
        ("DATA:image/webp;BASE64,AAEC", "image/webp", b"\x00\x01\x02"),
    ],
)
def test_parse_data_uri(uri, media_type, data):
    assert parse_data_uri(uri) == (media_type, data)


@pytest.mark.parametrize("uri", ["https://x/y.png", "data:image/png;base64", "data:image/png;base64,@@@"])
def test_parse_data_uri_refuses_malformed_input(uri):
    with pytest.raises(ValueError):
        parse_data_uri(uri)


def test_reference_uri_prefers_the_callers_url_over_bytes():
    assert reference_uri(ReferenceImage(content_type="image/png", data=PNG_BYTES, url="https://example.com/a.png")) == "https://example.com/a.png"
    assert reference_uri(ReferenceImage(content_type="image/png", data=PNG_BYTES)).startswith("data:image/png;base64,")


def test_output_image_keeps_urls_and_the_base64_of_data_uris():
    assert output_image("https://cdn/x.png", content_type="image/png").url == "https://cdn/x.png"
    inline = output_image("data:image/jpeg;base64," + base64.b64encode(b"jpg").decode(), content_type="image/png")
    assert (inline.b64, inline.data, inline.content_type, inline.url) == (base64.b64encode(b"jpg").decode(), None, "image/jpeg", None)
    wrapped = output_image("data:image/png;base64,iVBO\nRw0K", content_type="image/png")
    assert wrapped.b64 == "iVBORw0K"  # line-wrapped base64 is unwrapped, then kept
    plain = output_image("data:image/png,%89PNG", content_type="image/png")
    assert (plain.data, plain.b64) == (b"\x89PNG", None)  # not base64: decoded


@pytest.mark.parametrize(("url", "media_type"), [("https://r/out-0.webp", "image/webp"), ("https://r/a.jpg?sig=1", "image/jpeg"), ("https://r/blob", None)])
def test_content_type_from_url(url, media_type):
    assert content_type_from_url(url) == media_type
