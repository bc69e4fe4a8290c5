"""Errors the gateway answers with, in OpenAI's envelope.

Every error a caller sees is a `GatewayError`: it carries the HTTP status, the
OpenAI `type`, a stable `code`, the offending `param`, and whether a retry can
help (`x-should-retry`). Messages are written for the caller and must never
contain credentials or internal URLs.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """An error with everything needed to render the OpenAI error envelope."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None
    retryable_default: bool | None = None  # the x-should-retry a subclass implies

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retryable = self.retryable_default if retryable is None else retryable
        self.retry_after = retry_after
        self.details = details

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.details:
            body.update(self.details)
        return {"error": body}

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.retryable is False:
            headers["x-should-retry"] = "false"
        elif self.retryable is True:
            headers["x-should-retry"] = "true"
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after)))
        return headers


class RequestRefused(GatewayError):
    """The caller's request is refused as sent: sending it again unchanged cannot help (x-should-retry: false)."""

    retryable_default = False


class InvalidRequest(RequestRefused):
    """The request can never succeed as written (400)."""

    status = 400
    code = "invalid_request"


class Unprocessable(RequestRefused):
    """Well-formed, but no backend can do it (422)."""

    status = 422
    code = "unsupported_request"


class AuthenticationFailed(RequestRefused):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(RequestRefused):
    status = 404
    code = "not_found"


class PayloadTooLarge(RequestRefused):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestRefused):
    status = 415
    code = "unsupported_media_type"


class UpstreamFailed(GatewayError):
    """Every eligible backend failed (502), or none was available (503), or the
    deadline passed (504)."""

    status = 502
    type = "server_error"
    code = "all_backends_failed"


class ConfigError(ValueError):
    """A configuration problem, phrased as `file: field: problem`."""
