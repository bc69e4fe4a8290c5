"""The caller-facing error classes keep their status, OpenAI type, code and retry hint.

Callers and SDKs branch on these values, so each class's envelope and headers
are pinned here whatever base class it inherits them from.
"""

from __future__ import annotations

import pytest

from gateway.domain.errors import AuthenticationFailed, GatewayError, InvalidRequest, NotFound, PayloadTooLarge, Unprocessable, UnsupportedMediaType, UpstreamFailed

# (class, status, type, code, x-should-retry)
ERRORS = [
    (InvalidRequest, 400, "invalid_request_error", "invalid_request", "false"),
    (Unprocessable, 422, "invalid_request_error", "unsupported_request", "false"),
    (AuthenticationFailed, 401, "authentication_error", "invalid_api_key", "false"),
    (NotFound, 404, "invalid_request_error", "not_found", "false"),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large", "false"),
    (UnsupportedMediaType, 415, "invalid_request_error", "unsupported_media_type", "false"),
    (UpstreamFailed, 502, "server_error", "all_backends_failed", None),
]


@pytest.mark.parametrize(("cls", "status", "type_", "code", "should_retry"), ERRORS, ids=[row[0].__name__ for row in ERRORS])
def test_each_error_class_answers_with_its_status_type_code_and_retry_hint(cls: type[GatewayError], status: int, type_: str, code: str, should_retry: str | None) -> None:
    error = cls("refused", param="prompt")
    assert error.status == status
    assert error.envelope() == {"error": {"message": "refused", "type": type_, "param": "prompt", "code": code}}
    assert error.headers().get("x-should-retry") == should_retry
