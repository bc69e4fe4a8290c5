"""The credential-field pattern scrubs values, not the gateway's own instructions; the quick checks that skip it decide as the full ones."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import redaction
from gateway.observability import logs
from gateway.redaction import REDACTED, redact


@pytest.mark.parametrize(
    "text",
    [
        "backend fal: disabled (no credential: set FAL_KEY)",
        "backend replicate: disabled (no credential: set REPLICATE_API_TOKEN)",
        "secret: see the operator handbook",
        "token: none",
    ],
)
def test_instructions_after_a_field_name_are_kept(text):
    assert redact(text) == text


@pytest.mark.parametrize(
    "text,secret",
    [
        ("password: hunter2", "hunter2"),
        ("token: abc-def-ghi", "abc-def-ghi"),
        ("credential: r8-Zy1x", "r8-Zy1x"),
        ("api_key=plainwords", "plainwords"),
        ('{"password": "swordfish"}', "swordfish"),
        ("{'secret': 'opensesame'}", "opensesame"),
        ("secret = letmein", "letmein"),
    ],
)
def test_field_values_that_look_like_secrets_are_scrubbed(text, secret):
    scrubbed = redact(f"upstream said {text} then")
    assert secret not in scrubbed and REDACTED in scrubbed
    assert scrubbed.startswith("upstream said") and scrubbed.endswith("then")


def test_start_up_report_logs_which_variable_to_set():
    """The line a user reads when a backend is off names the variable, through the real JSON handler."""
    import io
    import json
    import logging

    from gateway.app import startup_report
    from gateway.observability.logs import configure_logging
    from tests.gateway_support import ENV, make_app

    app = make_app({k: v for k, v in ENV.items() if k != "FAL_KEY"})
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(stream=stream, secrets=[v for k, v in ENV.items() if k != "KLEIN_LOCAL_URL"])
    try:
        for line in startup_report(app.state.gateway):
            logging.getLogger("gateway.app").warning(line)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    messages = [json.loads(line)["msg"] for line in stream.getvalue().splitlines()]
    assert "backend fal: disabled (no credential: set FAL_KEY)" in messages
    assert not any(REDACTED in m for m in messages)


# ---- the fast paths decide as the full scan does ------------------------------

_PIECES = [
    "authoriz",
    "Bearer ",
    "BASIC",
    "key",
    "KeY",
    "token",
    "sk-",
    "SK-",
    "r8_",
    "R8_",
    "rf_",
    "://",
    "?",
    "&",
    "secret",
    "PassWord",
    "credential",
    "deadBEEF-",
    "0123456-",
    "\\u0041",
    "%41",
    "&#65;",
    "\u017fecret",
    "\u212aey",
    "\u00e9",
    "req_",
    "-",
    "_",
    " ",
]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=6)), max_size=8).map("".join))
def test_the_ascii_trigger_check_agrees_with_the_trigger_regex(text):
    assert redaction._triggered(text) == (redaction._TRIGGER.search(text) is not None)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=6)), max_size=8).map("".join))
def test_unescape_skipping_plain_ascii_gives_what_the_full_unescape_gives(text):
    assert redaction.unescape(text) == redaction._unescape_all(text)


def test_a_request_line_with_a_secret_in_a_field_is_still_scrubbed():
    redaction.register_secrets(["sk-fastpath-0123456789"])
    record = logging.LogRecord("klein.request", logging.INFO, __file__, 1, "request", None, None)
    record.__dict__.update(request_id="req_sk-fastpath-0123456789", route="generations", caller="r8_abcdefgh1234")
    logs.RedactingFilter().filter(record)
    line = logs.JsonFormatter().format(record)
    assert "fastpath" not in line and "r8_abcdefgh1234" not in line and REDACTED in line
