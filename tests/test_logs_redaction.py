"""The credential-field pattern scrubs values, not the gateway's own instructions."""

from __future__ import annotations

import pytest

from gateway.logs import REDACTED, redact


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
    from gateway.logs import configure_logging
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
