"""No provider key reaches a caller, a log line or /metrics, whatever a provider echoes.

Every adapter is driven through the whole gateway against a respx fake of its
provider that answers an error quoting every configured secret: at the 300
character cut, JSON-escaped in a body with no message field, percent-encoded,
in header-like text, in another case. The answer (body and headers), the log
output and the /metrics exposition must hold no key and no 8-character
fragment of one, in any of those spellings.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from gateway.observability.logs import configure_logging, secrets_from_env
from gateway.providers._wire import provider_text
from gateway.redaction import REDACTED, scrub, unescape
from tests.gateway_support import make_app

CALLER_KEY = "gw-caller-key-7f3a91c2d4e5"
KEYS = {
    "FAL_KEY": "5b3e0c2a-91d4-4c6e-8f1a-2d7b9e4c6a10:8c1f4e2b9d7a3c5e6f0b1a2d3c4e5f60",
    "REPLICATE_API_TOKEN": "r8_Xq7Lm2Pz9Rt4Vw6Ny1Bc3Dk5Fh8Gj0Sa",
    "RUNFLOW_API_KEY": "rf_live_Tg4Hy7Uj2Ik9Ol3Pm6Nb1Vc5Xz8Aq",
    "EMPIRIOLABS_API_KEY": "sk-emp-Wd3Fr6Gt9Hy2Ju5Ki8Lo1Pz4Xc7Vb",
}
SECRET_VALUES = [*KEYS.values(), CALLER_KEY]
BASES = {
    "fal": "http://fal.test",
    "replicate": "http://replicate.test",
    "runflow": "http://runflow.test",
    "empiriolabs": "http://empiriolabs.test",
    "local": "http://local.test:9000",
}
ENV = {
    **KEYS,
    "KLEIN_GATEWAY_KEYS": CALLER_KEY,
    "KLEIN_FAL_BASE_URL": BASES["fal"],
    "KLEIN_REPLICATE_BASE_URL": BASES["replicate"],
    "KLEIN_RUNFLOW_BASE_URL": BASES["runflow"],
    "KLEIN_EMPIRIOLABS_BASE_URL": BASES["empiriolabs"],
    "KLEIN_LOCAL_URL": BASES["local"],
}
FRAGMENT = 8


# ---- what a hostile provider writes -----------------------------------------


def json_escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


def every_key(spell: Callable[[str], str], sep: str = " ") -> str:
    return sep.join(spell(k) for k in SECRET_VALUES)


def message_body(adapter: str, message: str) -> dict[str, Any]:
    """The provider's documented error shape with `message` as its human text."""
    if adapter in ("fal", "replicate"):
        return {"detail": message}
    return {"error": {"message": message, "code": "invalid_request"}}


def at_the_cut(adapter: str, pad: int) -> str:
    """Every key, the first one starting `pad` characters in: around the 300-character cut."""
    return "x" * pad + every_key(str)


# (row id, status, a function of the adapter giving the raw body text)
ECHOES: list[tuple[str, int, Callable[[str], str]]] = [
    *[(f"cut-at-{pad}", 422, lambda a, pad=pad: json.dumps(message_body(a, at_the_cut(a, pad)))) for pad in (270, 285, 292, 296, 299)],
    ("json-escaped-no-message-field", 500, lambda a: '{"trace": "' + every_key(json_escaped) + '"}'),
    ("json-escaped-in-message", 422, lambda a: json.dumps(message_body(a, "bad key PLACEHOLDER")).replace("PLACEHOLDER", every_key(json_escaped))),
    ("double-escaped", 500, lambda a: '{"trace": "' + every_key(lambda k: json_escaped(k).replace("\\", "\\\\")) + '"}'),
    ("url-encoded", 422, lambda a: json.dumps(message_body(a, "callback=" + every_key(lambda k: quote(k, safe=""), "&k=")))),
    ("url-encoded-every-char", 500, lambda a: "upstream " + every_key(lambda k: "".join(f"%{b:02X}" for b in k.encode()))),
    ("header-like-text", 502, lambda a: "\r\n".join(f"Authorization: Bearer {k}\r\nX-Api-Key: {k}\r\nCookie: session={k}" for k in SECRET_VALUES)),
    ("plain-text-no-message-field", 500, lambda a: "<html>upstream failed for " + every_key(str, ", ") + "</html>"),
    ("upper-case", 422, lambda a: json.dumps(message_body(a, "key " + every_key(str.upper)))),
    ("html-entities", 500, lambda a: "denied " + every_key(lambda k: "".join(f"&#{ord(c)};" for c in k))),
    ("error-code-field", 400, lambda a: json.dumps({"error": {"code": every_key(str), "message": "bad"}, "error_type": KEYS["FAL_KEY"]})),
]


def hostile_router(adapter: str, status: int, body: str) -> respx.Router:
    """Every request to the adapter's provider answers `body`; the key also rides in a response header."""
    router = respx.Router(assert_all_called=False)
    headers = {"content-type": "application/json", "x-echo": KEYS["FAL_KEY"]}
    router.route(url__startswith=BASES[adapter]).mock(return_value=httpx.Response(status, text=body, headers=headers))
    return router


# ---- looking for keys ----------------------------------------------------------


def _decoded_forms(text: str) -> list[str]:
    """`text` and what it reads as once JSON, percent and HTML escapes are undone (independently of the gateway's code)."""
    forms = [text]
    current = text
    for _ in range(3):
        current = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), current.replace("\\\\", "\\"))
        current = unquote(current)
        current = re.sub(r"&#(\d+);", lambda m: chr(int(m.group(1))), current)
        forms.append(current)
    return [f.lower() for f in forms]


def leaked_fragments(text: str) -> list[str]:
    """Every 8-character (or longer) piece of a secret found in `text`, in any case or escape."""
    forms = _decoded_forms(text)
    found = []
    for secret in SECRET_VALUES:
        low = secret.lower()
        for i in range(len(low) - FRAGMENT + 1):
            piece = low[i : i + FRAGMENT]
            if any(piece in form for form in forms):
                found.append(piece)
    return found


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(stream=stream, level="DEBUG", secrets=[])
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


# ---- the guarantee, for every adapter ---------------------------------------


@pytest.mark.parametrize("adapter", sorted(BASES))
@pytest.mark.parametrize(("echo", "status", "body_of"), ECHOES, ids=[row[0] for row in ECHOES])
async def test_no_key_or_key_fragment_reaches_answer_log_or_metrics(adapter, echo, status, body_of, log_output):
    router = hostile_router(adapter, status, body_of(adapter))
    app = make_app(ENV, transport=httpx.MockTransport(router.async_handler))
    async with AsyncTestClient(app) as client:
        answer = await client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse at dusk", "size": "1024x1024", "provider": {"only": [adapter]}},
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        )
        metrics = await client.get("/metrics")
    assert router.calls, "the provider fake was never called"
    assert answer.status_code >= 400
    envelope = answer.json()["error"]
    assert envelope["message"] and envelope["type"]
    headers_text = "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
    for where, text in (("answer body", answer.text), ("answer headers", headers_text), ("log", log_output.getvalue()), ("/metrics", metrics.text)):
        assert not leaked_fragments(text), f"{adapter}/{echo}: key fragments in the {where}: {leaked_fragments(text)[:3]}"


# The job was accepted, ran, and failed with the key in its own error text
# (fal's COMPLETED-with-error, Replicate's failed prediction, Runflow's failed run).
JOB_ERRORS: list[tuple[str, Callable[[], str]]] = [
    ("cut-at-290", lambda: "y" * 290 + every_key(str)),
    ("json-escaped", lambda: "bad key " + every_key(json_escaped)),
    ("url-encoded", lambda: "bad key " + every_key(lambda k: quote(k, safe=""))),
    ("upper-case", lambda: "bad key " + every_key(str.upper)),
]


def failed_job_router(adapter: str, error: str) -> respx.Router:
    router = respx.Router(assert_all_called=False)
    base = BASES[adapter]
    if adapter == "fal":
        router.post(url__startswith=base).mock(return_value=httpx.Response(200, json={"request_id": "req-1", "status": "IN_QUEUE"}))
        router.get(url__startswith=base).mock(return_value=httpx.Response(200, json={"status": "COMPLETED", "error": error, "error_type": "runner_error"}))
    elif adapter == "replicate":
        failed = {"id": "p-1", "status": "failed", "error": error, "started_at": "2026-01-01T00:00:00Z"}
        router.post(url__startswith=base).mock(return_value=httpx.Response(201, json=failed))
        router.get(url__startswith=base).mock(return_value=httpx.Response(200, json=failed))
    else:
        failed = {"id": "run-1", "status": "failed", "failure_code": KEYS["RUNFLOW_API_KEY"], "failure_message": error}
        router.post(url__startswith=base).mock(return_value=httpx.Response(200, json=failed))
        router.get(url__startswith=base).mock(return_value=httpx.Response(200, json=failed))
    router.route(url__startswith=base).mock(return_value=httpx.Response(200, json={}))  # cancels
    return router


@pytest.mark.parametrize("adapter", ["fal", "replicate", "runflow"])
@pytest.mark.parametrize(("echo", "error_of"), JOB_ERRORS, ids=[row[0] for row in JOB_ERRORS])
async def test_a_failed_job_quoting_the_key_leaks_nothing(adapter, echo, error_of, log_output):
    router = failed_job_router(adapter, error_of())
    app = make_app(ENV, transport=httpx.MockTransport(router.async_handler))
    async with AsyncTestClient(app) as client:
        answer = await client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse at dusk", "size": "1024x1024", "provider": {"only": [adapter]}},
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        )
        metrics = await client.get("/metrics")
    assert answer.status_code >= 400
    assert [a.get("message") for a in answer.json()["error"].get("attempts", [])] == [f"{adapter} failed the request"], answer.text
    for where, text in (("answer", answer.text + str(answer.headers)), ("log", log_output.getvalue()), ("/metrics", metrics.text)):
        assert not leaked_fragments(text), f"{adapter}/{echo}: key fragments in the {where}"


async def test_the_provider_error_goes_to_the_operator_log_and_the_caller_gets_the_gateways_words(log_output):
    """The caller learns the class and status; the provider's text, masked, is in the log."""
    body = json.dumps({"detail": f"image_size is invalid for key {KEYS['FAL_KEY']}"})
    router = hostile_router("fal", 422, body)
    app = make_app(ENV, transport=httpx.MockTransport(router.async_handler))
    async with AsyncTestClient(app) as client:
        answer = await client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse", "size": "1024x1024", "provider": {"only": ["fal"]}},
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        )
    message = answer.json()["error"]["message"]
    assert "fal rejected the request (HTTP 422): invalid input" in message
    assert "image_size" not in answer.text
    assert "image_size is invalid for key" in log_output.getvalue()
    assert REDACTED in log_output.getvalue() and KEYS["FAL_KEY"] not in log_output.getvalue()


# ---- provider_text, row by row -----------------------------------------------

CRED = "abc12345-0000-4000-8000-00000000cafe:f00dfeedbeefcafe0123456789abcdef"
SECRET_PART = CRED.split(":")[1]


@pytest.mark.parametrize(
    ("text", "present", "absent"),
    [
        (f"bad key {CRED} sent", ["bad key", "sent"], [CRED, SECRET_PART]),
        (f"key id {CRED.split(':')[0]} unknown", ["key id", "unknown"], [CRED.split(":")[0]]),
        ("x" * 295 + CRED, [], [SECRET_PART[:8], CRED[:8]]),
        (json_escaped(CRED), [], [SECRET_PART[:8]]),
        (quote(CRED, safe=""), [], [SECRET_PART[:8]]),
        (CRED.upper(), [], [SECRET_PART[:8]]),
        (f"truncated by the provider: {SECRET_PART[:12]}", ["truncated by the provider"], [SECRET_PART[:8]]),
        (f"zero-width split {SECRET_PART[:10]}\u200b{SECRET_PART[10:]}", ["zero-width split"], [SECRET_PART[:8]]),
        ("Authorization: Key sk-unrelatedkey123456789", ["Authorization"], ["sk-unrelatedkey123456789"]),
        ("nothing to hide here", ["nothing to hide here"], []),
    ],
)
def test_provider_text_masks_the_credential_in_every_spelling(text, present, absent):
    out = provider_text(text, CRED)
    assert len(out) <= 300
    for piece in present:
        assert piece in out
    for piece in absent:
        assert piece.lower() not in unescape(out).lower()


def test_provider_text_redacts_before_it_clips():
    """A key that straddles the cut would survive in part if the text were clipped first."""
    text = "y" * 290 + CRED
    out = provider_text(text, CRED)
    assert out.endswith("...") or REDACTED in out
    assert CRED[:8] not in out and CRED[:5] + "..." not in out


def test_provider_text_without_a_credential_still_runs_the_log_patterns():
    assert "r8_AbCdEf0123456789" not in provider_text("token r8_AbCdEf0123456789 refused", None)


def test_provider_text_bounds_huge_bodies_and_control_characters():
    out = provider_text("\x1b[31m" + "z" * 10_000_000 + CRED, CRED)
    assert len(out) <= 300 and "\x1b" not in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\u0041\\u0042", "AB"),
        ("%41%42", "AB"),
        ("&#65;&#x42;", "AB"),
        ("\\\\u0041", "A"),
        ("\\x41", "A"),
        ("\uff21\uff22", "AB"),  # fullwidth letters fold to ASCII
        ("A\u200bB", "AB"),
        ("\\ud83d\\ude00", "\U0001f600"),
        ("\\ud83d alone", "\ufffd alone"),
        ("plain 100% sure", "plain 100% sure"),
    ],
)
def test_unescape_sees_through_disguises(text, expected):
    assert unescape(text) == expected


def test_log_scrub_sees_escaped_keys_but_leaves_ordinary_escapes_alone():
    escaped = json_escaped("sk-" + "Qw3Er5Ty7Ui9Op1As")
    assert "Qw3Er5Ty" not in unescape(scrub(f"upstream said {escaped}"))
    assert scrub("path /a%20b and \\n newline") == "path /a%20b and \\n newline"


def test_the_gateways_own_secrets_are_scrubbed_like_credentials():
    env = {"KLEIN_METRICS_TOKEN": "tok-metrics-1", "KLEIN_METRICS_KEY_SECRET": "label-secret-2", "KLEIN_URL_SIGNING_KEY": "url-signing-3", "FAL_KEY": "fal-4"}
    assert set(secrets_from_env(env)) == set(env.values())
