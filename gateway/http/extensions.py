"""Klein's own endpoints: quotes, backend health, metrics, liveness and readiness."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import MediaType, Request, Response, get, post

from gateway.domain.errors import AuthenticationFailed, NotFound
from gateway.domain.job import JobKind
from gateway.http.context import json_object
from gateway.http.entry import begin, gateway_of
from gateway.http.errors import envelope_response
from gateway.http.openai import _job_from_raw


@post("/v1/images/quote", status_code=200)
async def quote(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The generation body in; every backend's price and eligibility out. Nothing is generated."""
    gw = gateway_of(request)
    ctx = begin(request, gw)
    raw = await json_object(request)
    edit_refs = raw.pop("edit_images", None)
    if isinstance(edit_refs, int) and not isinstance(edit_refs, bool) and "images" not in raw:
        # Quote an edit with k references without uploading them (what `klein-gateway quote --edit-images` sends).
        raw["images"] = [_PLACEHOLDER_REF] * max(0, min(edit_refs, 8))
    job = _job_from_raw(raw, gw, ctx, JobKind.GENERATE)
    table = await gw.quote_table(job)
    return Response(msgspec.json.encode(table), media_type=MediaType.JSON, headers={"x-request-id": ctx.request_id})


def _placeholder_png() -> str:
    """A 64x64 PNG data URI, used only to count references in a quote; never sent anywhere."""
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


_PLACEHOLDER_REF = _placeholder_png()


@get("/v1/backends")
async def backends(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw = gateway_of(request)
    begin(request, gw)
    described = await gw.health.describe(list(gw.fleet.backends))
    data = []
    for name, backend in sorted(gw.fleet.backends.items()):
        row = {"name": name, "kind": backend.kind, "enabled": True, "price_basis": backend.sheet.basis, "price_source": backend.sheet.source}
        row.update(described.get(name, {}))
        data.append(row)
    for name, reason in sorted(gw.fleet.disabled.items()):
        data.append({"name": name, "enabled": False, "reason": reason})
    return Response(msgspec.json.encode({"object": "list", "data": data}), media_type=MediaType.JSON)


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The Prometheus exposition; behind KLEIN_METRICS_TOKEN, or only on KLEIN_METRICS_PORT (gateway.observability.metrics_access)."""
    gw = gateway_of(request)
    if gw.metrics_access.port is not None:
        raise NotFound("metrics are served on a separate port, not on this one", code="not_found")
    if gw.metrics_access.closed:
        err = AuthenticationFailed("/metrics is closed: caller keys are required, so set KLEIN_METRICS_TOKEN (then scrape with Authorization: Bearer) or KLEIN_METRICS_PORT", code="metrics_closed")
        return envelope_response(err, {"www-authenticate": 'Bearer realm="metrics"'})
    if not gw.metrics_access.allows(request.headers.get("authorization")):
        err = AuthenticationFailed("/metrics needs Authorization: Bearer <KLEIN_METRICS_TOKEN>", code="invalid_metrics_token")
        return envelope_response(err, {"www-authenticate": 'Bearer realm="metrics"'})
    body, content_type = gw.metrics.render()
    return Response(body, media_type=content_type)


@get("/healthz")
async def healthz() -> Response[bytes]:
    return Response(b'{"status":"ok"}', media_type=MediaType.JSON)


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Ready once config is loaded and the state store answers; degraded (still 200) on a
    Redis outage, since each replica carries on with its own memory. 503 from the
    moment a shutdown begins, so load balancers stop sending before the socket closes."""
    gw = gateway_of(request)
    store_status = str(await gw.store.status())
    ready = gw.ready and bool(gw.fleet.backends) and not gw.drain.draining
    status = "draining" if gw.drain.draining else "ready" if ready else "not_ready"
    body = {"status": status, "state_store": store_status, "backends": len(gw.fleet.backends)}
    return Response(msgspec.json.encode(body), media_type=MediaType.JSON, status_code=200 if ready else 503)


ROUTES = [quote, backends, metrics, healthz, readyz]
