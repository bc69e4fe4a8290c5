"""Every error leaves the gateway in OpenAI's envelope, whatever raised it."""

from __future__ import annotations

import logging

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotFoundException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from gateway.errors import GatewayError

log = logging.getLogger("klein.gateway")

_HTTP_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def envelope_response(err: GatewayError, extra_headers: dict[str, str] | None = None) -> Response[bytes]:
    headers = err.headers()
    if extra_headers:
        headers.update(extra_headers)
    return Response(msgspec.json.encode(err.envelope()), status_code=err.status, media_type=MediaType.JSON, headers=headers)


def gateway_error_handler(request: Request, exc: GatewayError) -> Response[bytes]:
    extra = getattr(request.state, "klein_headers", None)
    return envelope_response(exc, extra)


def http_exception_handler(_: Request, exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (unknown route, bad multipart, body too large)."""
    status = exc.status_code
    if isinstance(exc, NotFoundException):
        message = "no such endpoint; see GET /v1/models and POST /v1/images/generations"
    elif status == 413:
        message = "request body is too large"
    else:
        message = str(exc.detail) if exc.detail else "bad request"
    err = GatewayError(message, status=status, code=_HTTP_CODES.get(status, "http_error"), retryable=False if status < 500 else None)
    err.type = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return envelope_response(err)


def internal_error_handler(request: Request, exc: Exception) -> Response[bytes]:
    """A bug: log it with the request id (no request body), answer a plain 500."""
    request_id = getattr(request.state, "request_id", "-")
    log.exception("unhandled error in request %s: %s", request_id, type(exc).__name__)
    err = GatewayError("internal error; the request id is in x-request-id", status=HTTP_500_INTERNAL_SERVER_ERROR, code="internal_error")
    err.type = "server_error"
    return envelope_response(err, getattr(request.state, "klein_headers", None))
