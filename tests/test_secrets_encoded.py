"""A key quoted by a provider in an encoded spelling reaches no caller.

Providers echo credentials base64-encoded (of the key, or of the header
`Bearer <key>` / `Key <key>`), url-safe, hex, URL-encoded or split by
separators. `redact` masks each of those for every registered secret, and
the caller never sees the provider's text anyway: the error message, the
attempts and /v1/backends' last_error are in the gateway's own words.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest
from litestar.testing import AsyncTestClient

from gateway.health.records import sanitise
from gateway.redaction import REDACTED, encoded_forms, redact, register_secrets
from tests.gateway_support import make_app
from tests.test_secrets import CALLER_KEY, ENV, KEYS, hostile_router, log_output  # noqa: F401 - a fixture

SECRET = KEYS["REPLICATE_API_TOKEN"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


ENCODINGS: dict[str, Callable[[str], str]] = {
    "base64": lambda k: _b64(k.encode()),
    "base64-unpadded": lambda k: _b64(k.encode()).rstrip("="),
    "base64url": lambda k: _b64url(k.encode()),
    "base64url-unpadded": lambda k: _b64url(k.encode()).rstrip("="),
    "base64-inside-a-blob-offset-1": lambda k: _b64(b"{" + k.encode() + b"}"),
    "base64-inside-a-blob-offset-2": lambda k: _b64(b'{"' + k.encode() + b'"}'),
    "base64url-inside-a-blob-offset-2": lambda k: _b64url(b"k=" + k.encode() + b"&x=1").rstrip("="),
    "base64-of-bearer": lambda k: _b64(b"Bearer " + k.encode()),
    "base64-of-key": lambda k: _b64(b"Key " + k.encode()),
    "base64url-of-bearer": lambda k: _b64url(b"Bearer " + k.encode()).rstrip("="),
    "hex": lambda k: binascii.hexlify(k.encode()).decode(),
    "HEX": lambda k: binascii.hexlify(k.encode()).decode().upper(),
    "url-encoded": lambda k: quote(k, safe=""),
    "split-by-dashes": lambda k: "-".join(k[i : i + 4] for i in range(0, len(k), 4)),
    "split-by-spaces": lambda k: " ".join(k[i : i + 5] for i in range(0, len(k), 5)),
    "split-by-dots": lambda k: ".".join(k[i : i + 3] for i in range(0, len(k), 3)),
    "split-by-slashes": lambda k: "/".join(k[i : i + 6] for i in range(0, len(k), 6)),
    "split-by-underscores": lambda k: "_".join(k),
    "separators-swapped": lambda k: k.replace("_", "-").replace("-", " "),
}


def _leaks(text: str, secret: str, encoding: str) -> bool:
    """Whether `text` holds the encoded secret or its 12-character core."""
    spelled = ENCODINGS[encoding](secret)
    if spelled in text:
        return True
    core = sorted(encoded_forms(secret), key=len)[0] if encoding.startswith(("base64", "hex", "HEX")) else ""
    return bool(core) and core.lower() in text.lower()


@pytest.mark.parametrize("secret", [*KEYS.values(), CALLER_KEY], ids=[*KEYS, "caller"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_redact_masks_every_encoded_spelling_of_a_registered_secret(encoding, secret):
    register_secrets([secret])
    spelled = ENCODINGS[encoding](secret)
    out = redact(f"upstream said: {spelled} (request 12)")
    assert REDACTED in out and not _leaks(out, secret, encoding), out
    assert out.startswith("upstream said: ") and out.endswith("(request 12)")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_redact_masks_the_encoded_spellings_of_a_secret_passed_in(encoding):
    secret = "pk_passed_in_Zy81Qx42Lm"
    out = redact(f"echo {ENCODINGS[encoding](secret)}", [secret])
    assert REDACTED in out and ENCODINGS[encoding](secret) not in out


@pytest.mark.parametrize(
    "text",
    ["GET /v1/images/generations 200", "a-b-c d.e/f_g", "aGVsbG8gd29ybGQ=", "deadbeefcafe", "Key rotation is due"],
)
def test_redact_leaves_text_without_a_secret_alone(text):
    register_secrets([SECRET])
    assert redact(text) == text


def test_short_secrets_get_no_encoded_spellings():
    """Under 8 characters their encodings would shred ordinary base64 and hex."""
    assert encoded_forms("abc1234") == ()
    assert encoded_forms("abcd12345")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("adapter", "status"), [("replicate", 422), ("replicate", 500), ("fal", 429), ("runflow", 400), ("empiriolabs", 503)])
async def test_an_encoded_key_in_a_provider_error_reaches_neither_the_answer_nor_backends(adapter, status, encoding, log_output):  # noqa: F811
    env_name = {"replicate": "REPLICATE_API_TOKEN", "fal": "FAL_KEY", "runflow": "RUNFLOW_API_KEY", "empiriolabs": "EMPIRIOLABS_API_KEY"}[adapter]
    secret = KEYS[env_name]
    spelled = ENCODINGS[encoding](secret)
    body = f'{{"detail": "auth header was {spelled}", "error": {{"message": "bad credential {spelled}"}}}}'
    app = make_app(ENV, transport=httpx.MockTransport(hostile_router(adapter, status, body).async_handler))
    async with AsyncTestClient(app) as client:
        answer = await client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse at dusk", "size": "1024x1024", "provider": {"only": [adapter]}},
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        )
        backends = await client.get("/v1/backends", headers={"authorization": f"Bearer {CALLER_KEY}"})
    assert answer.status_code >= 400
    error = answer.json()["error"]
    assert "auth header was" not in answer.text and "bad credential" not in answer.text
    assert not _leaks(answer.text, secret, encoding)
    assert next(a["message"] for a in error.get("attempts", [])).startswith(f"{adapter} ")
    row = next(r for r in backends.json()["data"] if r["name"] == adapter)
    last_error = row.get("last_error") or row.get("health", {}).get("last_error")
    assert last_error is not None, row
    assert last_error["message"].startswith(f"{adapter} ") and f"(HTTP {status})" in last_error["message"]
    assert not _leaks(backends.text, secret, encoding) and "bad credential" not in backends.text
    log = log_output.getvalue()
    assert "auth header was" in log or "bad credential" in log, "the operator still reads what the provider said"
    assert not _leaks(log, secret, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_probe_detail_on_backends_masks_every_encoded_spelling(encoding):
    register_secrets([SECRET])
    out = sanitise(f"not ready: HTTP 503: {ENCODINGS[encoding](SECRET)}")
    assert out.startswith("not ready: HTTP 503") and not _leaks(out, SECRET, encoding), out
