"""Every error leaves the gateway in OpenAI's envelope, whatever raised it."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Message, Scope

from gateway.domain.errors import GatewayError
from gateway.http.context import request_id_for

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
    extra = getattr(request.state, "klein_headers", None) or {"x-request-id": request_id_for(request)}
    return envelope_response(exc, extra)


def http_exception_handler(request: Request, exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (unknown route, wrong method, bad multipart, body
    too large, a malformed query parameter): the envelope, the request id, the
    `Allow` of a 405, and a log line and count under their real status."""
    status = exc.status_code
    param = None
    if isinstance(exc, NotFoundException):
        message = "no such endpoint; see GET /v1/models and POST /v1/images/generations"
    elif isinstance(exc, MethodNotAllowedException):
        allowed = (exc.headers or {}).get("allow", "")
        message = f"method {request.method} is not allowed here; allowed: {allowed}" if allowed else f"method {request.method} is not allowed here"
    elif status == 413:
        message = "request body is too large"
    elif isinstance(exc, ValidationException):
        param, message = _validation_message(exc)
    else:
        message = str(exc.detail) if exc.detail else "bad request"
    err = GatewayError(message, status=status, param=param, code=_HTTP_CODES.get(status, "http_error"), retryable=False if status < 500 else None)
    err.type = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    headers.update(getattr(request.state, "klein_headers", None) or {"x-request-id": request_id_for(request)})
    observe_unhandled(request, status)
    return envelope_response(err, headers)


def _validation_message(exc: ValidationException) -> tuple[str | None, str]:
    """(param, message) naming the bad parameter; never litestar's detail, which quotes the URL."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    first: dict[str, Any] = problems[0] if problems and isinstance(problems[0], dict) else {}
    key = first.get("key") if isinstance(first.get("key"), str) else None
    what = first.get("message") if isinstance(first.get("message"), str) else "is not valid"
    return key, f"{key}: {what}" if key else f"the request is not valid: {what}"


def observe_unhandled(request: Request, status: int) -> None:
    """Count and log an answer no handler counted itself (it failed before or
    outside the handler). Such requests were never timed: latency is 0."""
    state = request.scope.setdefault("state", {})
    if state.get("klein_observed"):
        return
    state["klein_observed"] = True
    gw = getattr(request.app.state, "gateway", None)
    if gw is None:
        return
    handler = request.scope.get("route_handler")
    route = getattr(handler, "handler_name", None) or "unmatched"
    gw.metrics.observe_request(route=route, status=status, backend=None, latency_s=0.0, overhead_s=0.0)
    gw.log_request(request, route=route, status=status, backend=None, attempts=0, cost=None, latency_s=0.0, overhead_s=0.0)


async def stamp_request_id(message: Message, scope: Scope) -> None:
    """Every answer carries `x-request-id`, whatever produced it."""
    if message["type"] != "http.response.start":
        return
    headers = list(message.get("headers") or [])
    if any(name.lower() == b"x-request-id" for name, _ in headers):
        return
    headers.append((b"x-request-id", request_id_for(Request(scope)).encode()))
    message["headers"] = headers


def internal_error_handler(request: Request, exc: Exception) -> Response[bytes]:
    """A bug: log it with the request id (no request body), answer a plain 500."""
    request_id = request_id_for(request)
    log.exception("unhandled error in request %s: %s", request_id, type(exc).__name__)
    observe_unhandled(request, HTTP_500_INTERNAL_SERVER_ERROR)
    err = GatewayError("internal error; the request id is in x-request-id", status=HTTP_500_INTERNAL_SERVER_ERROR, code="internal_error")
    err.type = "server_error"
    return envelope_response(err, getattr(request.state, "klein_headers", None))
