"""Hostile input, row by row: every answer is a 4xx in OpenAI's envelope;
and a hostile provider's errors never carry its key to the caller.

Each row is one request an attacker or a broken client could send. For each
the test asserts the status, the envelope `{"error": {message, type, param,
code}}`, a message that says what was wrong, an `x-request-id`, that no
backend was called, and that no secret (a provider key or the caller's key)
appears in the body, the headers or anything logged while it was handled.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from PIL import Image

from gateway.dispatch.references import MAX_REFERENCE_BYTES
from tests.gateway_support import ENV, SECRETS, FakeAdapter, install_fakes, make_app, png_bytes

CALLER_KEY = "caller-key-5e1f0c2a9b"
AUTH = {"authorization": f"Bearer {CALLER_KEY}"}
ENABLED = ["local", "replicate", "fal", "runflow"]  # empiriolabs is disabled: no key
METRICS_TOKEN = "metrics-token-8c2d41e7"  # caller keys are required, so /metrics is read with a token
HOSTILE_ENV = {**{k: v for k, v in ENV.items() if k != "EMPIRIOLABS_API_KEY"}, "KLEIN_GATEWAY_KEYS": CALLER_KEY, "KLEIN_METRICS_TOKEN": METRICS_TOKEN}
ALL_SECRETS = [*SECRETS.values(), CALLER_KEY, METRICS_TOKEN]
GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


def noisy_png(width: int = 256, height: int = 256) -> bytes:
    """A PNG whose pixel data does not compress away, so cutting it loses pixels."""
    rng = random.Random(7)
    img = Image.frombytes("RGB", (width, height), bytes(rng.getrandbits(8) for _ in range(width * height * 3)))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming `width` x `height`, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _chunk(b"IEND", b"")


GOOD_PNG = noisy_png()
TRUNCATED_PNG = GOOD_PNG[: len(GOOD_PNG) * 6 // 10]
# Valid header and chunk framing, but the compressed pixel stream is garbage.
CORRUPT_PNG = GOOD_PNG[:33] + _chunk(b"IDAT", b"\x78\x9c" + bytes(range(256)) * 4) + _chunk(b"IEND", b"")
BOMB_PNG = png_claiming(30000, 30000)
OVER_CAP_PNG = png_claiming(5000, 5000)  # 25 MP: over the 16.7 MP reference cap
JPEG_HEADER_ONLY = png_bytes(256, 256, "JPEG")[:200]


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def gen(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a lighthouse at dusk", **fields}


@dataclass(frozen=True)
class Row:
    """One hostile request and the answer it must get."""

    id: str
    method: str
    path: str
    status: int
    says: str  # a fragment the message must contain (case-insensitive): what was wrong
    code: str | None = None
    param: str | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: Any = None
    data: dict[str, str] | None = None
    auth: bool = True

    def request_kwargs(self) -> dict[str, Any]:
        headers = {**(AUTH if self.auth else {}), **self.headers}
        kwargs: dict[str, Any] = {"headers": headers}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
        if self.files is not None:
            kwargs["files"] = self.files
        if self.data is not None:
            kwargs["data"] = self.data
        return kwargs


JSON = {"content-type": "application/json"}
ASYNC = {"prefer": "respond-async"}
MULTIPART_B = {"content-type": "multipart/form-data; boundary=b"}
PROMPT_NOT_UTF8 = b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe\xc3\r\n--b--\r\n'  # a multipart body whose prompt is not UTF-8


def upload(data: bytes = GOOD_PNG, name: str = "a.png") -> dict[str, Any]:
    """The `files` of an edit that uploads one image, labelled image/png whatever `data` is."""
    return {"image": (name, data, "image/png")}


def form(**fields: str) -> dict[str, str]:
    """The text fields of an edit: a prompt, and `fields`."""
    return {"prompt": "x", **fields}


# (row id, what the message says, a reference image URL refused before anything is fetched: 400 invalid_image_url)
REFUSED_REFERENCE_URLS = [
    ("ref_javascript_url", "http(s)", "javascript:alert(1)"),
    ("ref_file_url", "http(s)", "file:///etc/passwd"),
    ("ref_loopback", "public", "http://127.0.0.1/a.png"),
    ("ref_localhost_name", "public", "http://localhost:8080/a.png"),
    ("ref_metadata_ip", "public", "http://169.254.169.254/latest/meta-data/"),
    ("ref_ipv4_mapped_ipv6", "public", "http://[::ffff:127.0.0.1]/a.png"),
    ("ref_url_5000_chars", "too long", "https://example.com/" + "a" * 5000),
    ("ref_decimal_ip", "public", "http://2852039166/a.png"),
    ("ref_short_loopback", "public", "http://127.1/a.png"),
    ("ref_hex_loopback", "public", "http://0x7f000001/a.png"),
    ("ref_nat64_private", "public", "http://[64:ff9b::a00:5]/a.png"),
    ("ref_6to4_private", "public", "http://[2002:7f00:1::]/a.png"),
    ("ref_unbalanced_bracket", "url", "http://[::1/x.png"),
    ("ref_port_out_of_range", "port", "http://example.com:99999/a.png"),
    ("ref_port_not_a_number", "port", "http://example.com:abc/a.png"),
]


def async_metadata(id: str, says: str, metadata: str) -> Row:
    """An async edit whose metadata field is past its bounds."""
    return Row(id, "POST", EDIT, 400, says, "invalid_metadata", "metadata", files=upload(name="ref.png"), data=form(size="512x512", metadata=metadata), headers=ASYNC)


ROWS: list[Row] = [
    # ---- JSON bodies that break parsers -------------------------------------------------
    Row("json_nested_1000_deep", "POST", GEN, 400, "nested", "invalid_json", content=b'{"prompt": "x", "a": ' + nested(1000) + b"}", headers=JSON),
    Row("json_nested_100k_deep", "POST", GEN, 400, "nested", "invalid_json", content=nested(100_000), headers=JSON),
    Row("json_nested_in_known_field", "POST", GEN, 400, "nested", "invalid_json", content=b'{"prompt": "x", "image_size": {"width": ' + nested(200) + b"}}", headers=JSON),
    Row("json_nested_on_quote", "POST", "/v1/images/quote", 400, "nested", "invalid_json", content=b'{"prompt": "x", "a": ' + nested(5000) + b"}", headers=JSON),
    Row("json_not_json", "POST", GEN, 400, "not valid json", "invalid_json", content=b"{prompt: cat", headers=JSON),
    Row("json_invalid_utf8", "POST", GEN, 400, "not valid json", "invalid_json", content=b'{"prompt": "\xff\xfe"}', headers=JSON),
    Row("json_array_body", "POST", GEN, 400, "json object", "invalid_json", content=b"[1, 2, 3]", headers=JSON),
    Row("json_empty_body", "POST", GEN, 400, "not valid json", "invalid_json", content=b"", headers=JSON),
    Row("json_nan_literal", "POST", GEN, 400, "not valid json", "invalid_json", content=b'{"prompt": "x", "guidance_scale": NaN}', headers=JSON),
    Row("json_integer_400_digits", "POST", GEN, 400, "n", param="n", json=None, content=b'{"prompt": "x", "n": ' + b"9" * 400 + b"}", headers=JSON),
    Row("text_plain_body", "POST", GEN, 415, "send json", "unsupported_media_type", content=b"prompt=cat", headers={"content-type": "text/plain"}),
    # ---- header abuse -------------------------------------------------------------------
    Row("deadline_400_digits", "POST", GEN, 400, "x-klein-deadline-ms", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "9" * 400}),
    Row("deadline_30_digits", "POST", GEN, 400, "x-klein-deadline-ms", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "1" * 30}),
    Row("deadline_leading_zeros", "POST", GEN, 400, "x-klein-deadline-ms", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "0" * 300 + "5"}),
    Row("deadline_negative", "POST", GEN, 400, "positive", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "-5"}),
    Row("deadline_zero", "POST", GEN, 400, "positive", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "0"}),
    Row("deadline_fraction", "POST", GEN, 400, "integer", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "1.5"}),
    Row("deadline_exponent", "POST", GEN, 400, "integer", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "1e400"}),
    Row("deadline_words", "POST", GEN, 400, "integer", "invalid_deadline", "x-klein-deadline-ms", json=gen(), headers={"x-klein-deadline-ms": "soon"}),
    Row("no_authorization", "POST", GEN, 401, "api key", "invalid_api_key", json=gen(), auth=False),
    Row("wrong_key", "POST", GEN, 401, "api key", "invalid_api_key", json=gen(), auth=False, headers={"authorization": "Bearer " + SECRETS["FAL_KEY"]}),
    Row("basic_scheme", "POST", GEN, 401, "api key", "invalid_api_key", json=gen(), auth=False, headers={"authorization": "Basic " + base64.b64encode(f"u:{CALLER_KEY}".encode()).decode()}),
    Row("key_with_suffix", "GET", "/v1/models", 401, "api key", "invalid_api_key", auth=False, headers={"authorization": f"Bearer {CALLER_KEY}x"}),
    Row("key_in_query_string", "GET", f"/v1/models?api_key={CALLER_KEY}", 401, "api key", "invalid_api_key", auth=False),
    # ---- the model field ----------------------------------------------------------------
    Row("model_5mb", "POST", GEN, 400, "model", "invalid_value", "model", json=gen(model="m" * 5_000_000)),
    Row("model_5mb_on_quote", "POST", "/v1/images/quote", 400, "model", "invalid_value", "model", json=gen(model="m" * 5_000_000)),
    Row("model_unknown_200_chars", "POST", GEN, 404, "does not exist", "model_not_found", "model", json=gen(model="z" * 200)),
    Row("model_path_5000_chars", "GET", "/v1/models/" + "q" * 5000, 404, "does not exist", "model_not_found", "model"),
    Row("model_not_a_string", "POST", GEN, 400, "model", "invalid_value", "model", json=gen(model=["flux-2-klein-4b"])),
    Row("model_pins_disabled_backend", "POST", GEN, 400, "not enabled", "backend_disabled", "model", json=gen(model="empiriolabs/flux-2-klein-4b")),
    Row("only_names_disabled_backend", "POST", GEN, 400, "not enabled", "backend_disabled", "provider", json=gen(provider={"only": ["empiriolabs"]})),
    Row("only_unknown_backend", "POST", GEN, 400, "unknown backend", "unknown_backend", "provider", json=gen(provider={"only": ["nowhere"]})),
    # ---- numbers and sizes --------------------------------------------------------------
    Row("seed_2_pow_64", "POST", GEN, 400, "seed", "invalid_value", "seed", json=gen(seed=2**64)),
    Row("n_boolean_string", "POST", GEN, 400, "n", "invalid_value", "n", json=gen(n="true")),
    Row("guidance_overflows_float", "POST", GEN, 400, "not valid json", "invalid_json", content=b'{"prompt": "x", "guidance_scale": 1e400}', headers=JSON),
    Row("guidance_string_inf", "POST", GEN, 400, "guidance_scale", "invalid_value", "guidance_scale", json=gen(guidance_scale="inf")),
    Row("size_huge_digits", "POST", GEN, 400, "size", "invalid_size", "size", json=gen(size="9" * 40 + "x" + "9" * 40)),
    Row("size_exponent", "POST", GEN, 400, "size", "invalid_size", "size", json=gen(size="1e5x1e5")),
    Row("size_negative", "POST", GEN, 400, "size", "invalid_size", "size", json=gen(size="-512x512")),
    Row("aspect_divide_by_zero", "POST", GEN, 400, "aspect_ratio", "invalid_aspect_ratio", "aspect_ratio", json=gen(aspect_ratio="1:0")),
    Row("aspect_huge", "POST", GEN, 400, "aspect_ratio", "invalid_aspect_ratio", "aspect_ratio", json=gen(aspect_ratio="9" * 50 + ":1")),
    Row("image_size_float_width", "POST", GEN, 400, "image_size", "invalid_size", "image_size", json=gen(image_size={"width": 1e308, "height": 512})),
    Row("image_size_huge_int", "POST", GEN, 400, "size", "invalid_size", "size", json=gen(image_size={"width": 10**30, "height": 512})),
    Row("image_size_extra_keys", "POST", GEN, 400, "image_size", "invalid_size", "image_size", json=gen(image_size={"width": 512, "height": 512, "x": 1})),
    Row("provider_not_object", "POST", GEN, 400, "provider", "invalid_value", "provider", json=gen(provider="fal")),
    Row("provider_price_nan", "POST", GEN, 400, "max_price", "invalid_value", "provider.max_price", json=gen(provider={"max_price": "NaN"})),
    Row("provider_price_words", "POST", GEN, 400, "max_price", "invalid_value", "provider.max_price", json=gen(provider={"max_price": "cheap"})),
    Row("provider_order_17_names", "POST", GEN, 400, "provider.order", "invalid_value", "provider.order", json=gen(provider={"order": ["fal"] * 17})),
    Row("provider_unknown_field", "POST", GEN, 400, "not a known field", "invalid_value", "provider.sort", json=gen(provider={"sort": "price"})),
    Row("user_too_long", "POST", GEN, 400, "user", "invalid_value", "user", json=gen(user="u" * 257)),
    Row("prompt_too_long", "POST", GEN, 400, "the limit is", "prompt_too_long", "prompt", json=gen(prompt="p" * 4001)),
    # ---- references in JSON ------------------------------------------------------------
    Row("images_not_a_list", "POST", GEN, 400, "images", "invalid_value", "images", json=gen(images="https://example.com/a.png")),
    Row("images_number", "POST", GEN, 400, "reference", "invalid_image", "images[0]", json=gen(images=[123])),
    Row("ref_truncated_png", "POST", GEN, 422, "could not be decoded", "invalid_image", "images[0]", json=gen(images=[data_uri(TRUNCATED_PNG)])),
    Row("ref_corrupt_png", "POST", GEN, 422, "could not be decoded", "invalid_image", "images[0]", json=gen(images=[data_uri(CORRUPT_PNG)])),
    Row("ref_jpeg_cut_in_header", "POST", GEN, 400, "could not be read", "invalid_image", "images[0]", json=gen(images=[data_uri(JPEG_HEADER_ONLY, "image/jpeg")])),
    Row("ref_bomb_png", "POST", GEN, 413, "pixels", "payload_too_large", "images[0]", json=gen(images=[data_uri(BOMB_PNG)])),
    Row("ref_over_pixel_cap", "POST", GEN, 413, "pixels", "payload_too_large", "images[0]", json=gen(images=[data_uri(OVER_CAP_PNG)])),
    Row("ref_gif", "POST", GEN, 415, "png, jpeg or webp", "unsupported_media_type", "images[0]", json=gen(images=[data_uri(b"GIF89a" + b"\x00" * 64, "image/gif")])),
    Row("ref_not_base64", "POST", GEN, 400, "base64", "invalid_image", "images[0]", json=gen(images=["data:image/png;base64,****"])),
    *(Row(id, "POST", GEN, 400, says, "invalid_image_url", "images[0]", json=gen(images=[url])) for id, says, url in REFUSED_REFERENCE_URLS),
    # ---- multipart edits --------------------------------------------------------------
    Row("upload_over_per_image_cap", "POST", EDIT, 413, "limit", "payload_too_large", "image", files=upload(GOOD_PNG + b"\x00" * MAX_REFERENCE_BYTES), data=form()),
    Row("upload_truncated_png", "POST", EDIT, 422, "could not be decoded", "invalid_image", "image", files=upload(TRUNCATED_PNG), data=form()),
    Row("upload_corrupt_png", "POST", EDIT, 422, "could not be decoded", "invalid_image", "image", files=upload(CORRUPT_PNG), data=form()),
    Row("upload_bomb_png", "POST", EDIT, 413, "pixels", "payload_too_large", "image", files=upload(BOMB_PNG), data=form()),
    Row("upload_text_as_png", "POST", EDIT, 415, "png, jpeg or webp", "unsupported_media_type", "image", files=upload(b"#!/bin/sh\nrm -rf /\n"), data=form()),
    Row("upload_image_as_text_field", "POST", EDIT, 400, "file upload", "invalid_image", "image", data=form(image="not a file")),
    Row("upload_unknown_file_field", "POST", EDIT, 400, "unexpected file field", "invalid_image", "payload", files={"payload": ("a.png", GOOD_PNG, "image/png")}, data=form()),
    Row("upload_mask", "POST", EDIT, 400, "mask", "unsupported_parameter", "mask", files={**upload(), "mask": ("m.png", GOOD_PNG, "image/png")}, data=form()),
    Row("upload_provider_not_json", "POST", EDIT, 400, "provider is not valid json", "invalid_json", "provider", files=upload(), data=form(provider="{fal")),
    Row("upload_provider_nested_deep", "POST", EDIT, 400, "nested", "invalid_json", "provider", files=upload(), data=form(provider="[" * 5000 + "]" * 5000)),
    Row("upload_no_image", "POST", EDIT, 400, "1 to 4 images", "missing_image", "image", data=form()),
    Row("edit_wrong_content_type", "POST", EDIT, 415, "multipart/form-data", "unsupported_media_type", content=b"x", headers={"content-type": "text/plain"}),
    # ---- errors litestar raises itself -----------------------------------------------
    Row(
        "multipart_broken_body",
        "POST",
        EDIT,
        400,
        "multipart",
        content=b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--xyz',
        headers={"content-type": "multipart/form-data; boundary=abc"},
    ),
    Row("body_over_limit", "POST", GEN, 413, "too large", "payload_too_large", content=b'{"prompt": "' + b"x" * (64 * 1024 * 1024) + b'"}', headers=JSON),
    Row("content_length_not_a_number", "POST", GEN, 400, "content-length", json=gen(), headers={"content-length": "abc"}),
    Row("method_not_allowed_get_generations", "GET", GEN, 405, "method", "method_not_allowed"),
    Row("method_not_allowed_delete_models", "DELETE", "/v1/models", 405, "method", "method_not_allowed"),
    Row("unknown_route", "GET", "/v2/images/generations", 404, "no such endpoint", "not_found"),
    Row("unknown_route_unauthenticated", "POST", "/admin", 404, "no such endpoint", "not_found", auth=False),
    # ---- served image files ---------------------------------------------------------
    Row("file_sig_non_ascii", "GET", "/v1/images/files/abc.png?expires=9999999999&sig=%C3%A9t%C3%A9", 404, "not found", "image_not_found"),
    Row("file_sig_invalid_utf8", "GET", "/v1/images/files/abc.png?expires=9999999999&sig=%FF%FE", 404, "not found", "image_not_found"),
    Row("file_sig_emoji", "GET", "/v1/images/files/abc.png?expires=9999999999&sig=%F0%9F%94%91", 404, "not found", "image_not_found"),
    Row("file_sig_garbage", "GET", "/v1/images/files/abc.png?expires=9999999999&sig=" + "0" * 32, 404, "not found", "image_not_found"),
    Row("file_sig_long", "GET", "/v1/images/files/abc.png?expires=9999999999&sig=" + "a" * 5000, 404, "not found", "image_not_found"),
    Row("file_expires_not_int", "GET", "/v1/images/files/abc.png?expires=soon&sig=00", 400, "expires"),
    Row("file_expires_huge", "GET", "/v1/images/files/abc.png?expires=" + "9" * 400 + "&sig=00", 404, "not found", "image_not_found"),
    Row("file_expires_5000_digits", "GET", "/v1/images/files/abc.png?expires=" + "9" * 5000 + "&sig=00", 400, "expires", param="expires"),
    # ---- /v1/usage at the calendar's ends -------------------------------------------
    Row("usage_end_first_day", "GET", "/v1/usage?end=0001-01-01", 400, "start must be before end", "invalid_value", "start"),
    Row("usage_start_first_day_plus_14", "GET", "/v1/usage?start=0001-01-01T00:00:00%2B14:00", 400, "outside", "invalid_value", "start"),
    Row("usage_end_last_day_minus_14", "GET", "/v1/usage?end=9999-12-31T23:59:59-14:00", 400, "outside", "invalid_value", "end"),
    Row("usage_start_last_day_minus_14", "GET", "/v1/usage?start=9999-12-31T23:59:59-14:00", 400, "outside", "invalid_value", "start"),
    Row("usage_end_first_day_plus_14", "GET", "/v1/usage?end=0001-01-01T00:00:00%2B14:00", 400, "outside", "invalid_value", "end"),
    # ---- multipart text that is not UTF-8, and async metadata past its bounds ----------
    Row("multipart_prompt_not_utf8", "POST", EDIT, 400, "utf-8", "invalid_encoding", content=PROMPT_NOT_UTF8, headers=MULTIPART_B),
    Row("multipart_prompt_not_utf8_with_idempotency_key", "POST", EDIT, 400, "utf-8", "invalid_encoding", content=PROMPT_NOT_UTF8, headers={**MULTIPART_B, "idempotency-key": "k-utf8"}),
    async_metadata("async_metadata_nested_3000_deep", "nested at most 32", "[" * 3000 + "]" * 3000),
    async_metadata("async_metadata_nested_33_deep", "nested at most 32", '{"a": ' + "[" * 33 + "]" * 33 + "}"),
    async_metadata("async_metadata_over_64k", "characters", '{"a": "' + "x" * 70_000 + '"}'),
    # ---- n is a JSON integer in a JSON body -----------------------------------------------
    Row("n_true", "POST", GEN, 400, "integer", "invalid_value", "n", json=gen(size="512x512", n=True)),
    Row("n_false", "POST", GEN, 400, "integer", "invalid_value", "n", json=gen(size="512x512", n=False)),
    Row("n_string", "POST", GEN, 400, "integer", "invalid_value", "n", json=gen(size="512x512", n="2")),
    Row("n_float", "POST", GEN, 400, "integer", "invalid_value", "n", json=gen(size="512x512", n=2.0)),
    Row("n_string_on_json_edit", "POST", EDIT, 400, "integer", "invalid_value", "n", json=gen(size="512x512", n="2", images=[data_uri(GOOD_PNG)])),
    # ---- a deadline too short to honour -----------------------------------------------
    Row("deadline_one_ms", "POST", GEN, 400, "at least 100", "invalid_deadline", "x-klein-deadline-ms", json=gen(size="512x512"), headers={"x-klein-deadline-ms": "1"}),
    Row("deadline_99_ms", "POST", GEN, 400, "at least 100", "invalid_deadline", "x-klein-deadline-ms", json=gen(size="512x512"), headers={"x-klein-deadline-ms": "99"}),
    Row("deadline_one_ms_async", "POST", GEN, 400, "at least 100", "invalid_deadline", "x-klein-deadline-ms", json=gen(size="512x512"), headers={"x-klein-deadline-ms": "1", **ASYNC}),
    Row("file_name_non_ascii", "GET", "/v1/images/files/%C3%A9%F0%9F%94%91.png?expires=1&sig=00", 404, "not found", "image_not_found"),
]


def _param(row: Row) -> Any:
    return pytest.param(row, id=row.id)


@pytest.fixture
async def hostile():
    app = make_app(HOSTILE_ENV)
    fakes = {n: FakeAdapter(n) for n in ENABLED}
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        client.fakes = fakes  # type: ignore[attr-defined]
        yield client


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the handled request put into log records: message, arguments, extras, tracebacks."""
    parts = []
    for record in caplog.records:
        if record.name == "httpx" and "testserver" in record.getMessage():
            continue  # the test's own client logging the URL it sent, not the gateway
        parts.append(record.getMessage())
        parts.extend(str(v) for v in record.__dict__.values())
    return "\n".join(parts)


def test_the_table_is_large_and_its_ids_are_unique():
    assert len(ROWS) >= 60
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
async def test_hostile_input_gets_a_clear_4xx_envelope_and_leaks_nothing(hostile, caplog, row: Row):
    caplog.set_level(logging.DEBUG)
    resp = await hostile.request(row.method, row.path, **row.request_kwargs())
    assert resp.status_code == row.status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and 10 <= len(err["message"]) <= 600
    assert row.says.lower() in err["message"].lower(), err["message"]
    assert err["type"] == ("authentication_error" if row.status == 401 else "invalid_request_error")
    if row.code is not None:
        assert err["code"] == row.code
    if row.param is not None:
        assert err["param"] == row.param
    assert resp.headers.get("x-request-id"), "every answer carries x-request-id"
    if row.status == 405:
        assert resp.headers.get("allow"), "a 405 names the methods allowed"
    assert not any(f.calls for f in hostile.fakes.values()), "no backend may be called for bad input"
    seen = "\n".join([resp.text, json.dumps(dict(resp.headers)), _logged(caplog)])
    for secret in ALL_SECRETS:
        assert secret not in seen


# ---- a hostile provider: every backend echoes its own key in its error ----------------

HOSTS = {"queue.fal.run": "FAL_KEY", "api.replicate.com": "REPLICATE_API_TOKEN", "api.runflow.io": "RUNFLOW_API_KEY", "api.empiriolabs.ai": "EMPIRIOLABS_API_KEY"}


def _json_escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


def _echo(way: str, key: str) -> tuple[str, str]:
    """(content-type, body) of an error that carries `key` the way named."""
    if way == "message_at_the_cut":
        # Placed so that a 300-character clip before redaction keeps all of the key but its last 3 characters.
        text = "x" * (295 - len(key)) + f" key {key} rejected"
        return "application/json", json.dumps({"detail": text, "message": text, "error": text})
    if way == "raw_body_json_escaped":
        return "application/json", '{"trace": "auth ' + _json_escaped(key) + '"}'
    return "text/plain", f"upstream said: bad credential {key}"


def _echoing_transport(status: int, way: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        env = HOSTS.get(request.url.host)
        key = SECRETS[env] if env else "no-key"
        ctype, body = _echo(way, key)
        return httpx.Response(status, content=body.encode(), headers={"content-type": ctype})

    return httpx.MockTransport(handler)


def _unescaped(text: str) -> str:
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text.replace("\\\\", "\\"))


ECHOES = [pytest.param(status, way, id=f"{status}-{way}") for status in (400, 500) for way in ("message_at_the_cut", "raw_body_json_escaped", "plain_text")]


def _pieces(secret: str, width: int = 12) -> set[str]:
    """Every `width`-character run of a secret: a key cut short still leaks if one survives."""
    return {secret[i : i + width] for i in range(len(secret) - width + 1)}


@pytest.mark.parametrize("status,way", ECHOES)
async def test_a_provider_echoing_its_key_never_reaches_the_caller_or_the_log(caplog, status, way):
    caplog.set_level(logging.DEBUG)
    app = make_app({**ENV, "KLEIN_GATEWAY_KEYS": CALLER_KEY}, transport=_echoing_transport(status, way))
    async with AsyncTestClient(app) as client:
        resp = await client.post(GEN, json=gen(size="512x512"), headers=AUTH)
    assert resp.status_code in (422, 502), resp.text[:500]
    assert resp.json()["error"]["message"]
    seen = "\n".join([resp.text, json.dumps(dict(resp.headers)), _logged(caplog)])
    for text in (seen, _unescaped(seen)):
        for secret in ALL_SECRETS:
            leaked = [piece for piece in _pieces(secret) if piece in text]
            assert not leaked, f"part of a key leaked: {leaked[:3]}"


async def test_metrics_never_carry_a_guessable_digest_of_a_callers_key(hostile):
    import hashlib

    resp = await hostile.post(GEN, json=gen(size="512x512", response_format="b64_json"), headers=AUTH)
    assert resp.status_code == 200, resp.text
    scrape = await hostile.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    scraped = scrape.text
    assert scrape.status_code == 200 and "klein_cost_usd_total" in scraped
    assert CALLER_KEY not in scraped
    assert hashlib.sha256(CALLER_KEY.encode()).hexdigest()[:10] not in scraped, "an offline guess of the key can be confirmed against this label"
