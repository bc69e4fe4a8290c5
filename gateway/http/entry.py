"""How every route begins: the gateway, the caller, the deadline, the public base URL.

One authentication path for every route, in a module the route modules share,
so none of them imports another.
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from gateway.dispatch.shutdown import ShuttingDown
from gateway.http.context import CallContext, authenticate, deadline_for, request_id_for
from gateway.service import Gateway


def gateway_of(request: Request[Any, Any, Any]) -> Gateway:
    return request.app.state.gateway


def begin(request: Request[Any, Any, Any], gw: Gateway) -> CallContext:
    request_id = request_id_for(request)
    state = request.state  # litestar builds a new State object on every access
    state.klein_headers = {"x-request-id": request_id}
    if gw.drain.draining:
        state.klein_headers["connection"] = "close"  # the next request opens a connection elsewhere
        raise ShuttingDown("the gateway is shutting down; retry, another replica will answer", retry_after=1)
    key = authenticate(request, gw.keyring)
    caller = key.name if key else None
    state.caller = caller
    settings = gw.config.settings
    return CallContext(request_id, caller, deadline_for(request, settings.default_deadline_s, settings.max_deadline_s), key)


def base_url_of(request: Request[Any, Any, Any], gw: Gateway) -> str:
    """Where signed image URLs point: the configured public base URL, else the
    address this server is bound to. Never the caller's `Host` header, which
    would let a caller make the gateway hand out links to a host of its choosing."""
    configured = gw.config.settings.public_base_url
    if configured:
        return configured.rstrip("/")
    return bound_address(request.scope)


def bound_address(scope: Any) -> str:
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    host, port = scope.get("server") or ("127.0.0.1", None)
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"
