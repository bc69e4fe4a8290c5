"""Async image jobs over HTTP: accepting one (`Prefer: respond-async`), reading,
listing, following (server-sent events) and cancelling them.

A job is visible to its owner only, the caller key that made it; to any
other caller it does not exist (404), so ids cannot be probed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.response import Stream

from gateway.domain.errors import InvalidRequest, NotFound
from gateway.domain.job import ImageJob
from gateway.http.context import MAX_JSON_DEPTH, CallContext, deadline_for, decode_json, form_of
from gateway.http.entry import begin, gateway_of
from gateway.jobs.events import caught_up, follow
from gateway.jobs.model import STATUSES, JobRecord, Webhook, job_to_dict, new_job_id
from gateway.jobs.webhooks import vet_url
from gateway.routing.plan import refusal

if TYPE_CHECKING:
    from gateway.service import Gateway

MAX_METADATA_PAIRS = 16
MAX_METADATA_CHARS = 512
# The largest multipart `metadata` text read: 16 pairs of 64 + 512 characters,
# each escaped as \uXXXX, fit with room; anything longer is refused unread.
MAX_METADATA_JSON_CHARS = 64 * 1024
MAX_LIST = 100
log = logging.getLogger("gateway.jobs")
_PREFER = re.compile(r"(?:^|[,;\s])respond-async(?:$|[,;\s=])", re.IGNORECASE)


def prefers_async(request: Request[Any, Any, Any]) -> bool:
    """RFC 7240 `Prefer: respond-async` (among other preferences, any case)."""
    return any(_PREFER.search(value) for value in request.headers.getall("prefer", []))


def _job_response(record: JobRecord, *, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(msgspec.json.encode(record.public()), status_code=status, media_type=MediaType.JSON, headers=headers or {})


async def _extras(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """`webhook_url` and `metadata` from the body the job was built from."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await form_of(request)
        extras: dict[str, Any] = {}
        if "webhook_url" in form:
            extras["webhook_url"] = form.get("webhook_url")
        if "metadata" in form:
            extras["metadata"] = _form_metadata(form.get("metadata"))
        return extras
    raw = msgspec.json.decode(await request.body())
    return {k: raw[k] for k in ("webhook_url", "metadata") if k in raw and raw[k] is not None}


def _form_metadata(value: Any) -> Any:
    """A multipart `metadata` field decoded, bounded in size and depth before any decoding recursion."""
    if not isinstance(value, str):
        raise InvalidRequest("metadata must be a JSON object of strings", param="metadata", code="invalid_metadata")
    if len(value) > MAX_METADATA_JSON_CHARS:
        raise InvalidRequest(f"metadata is over {MAX_METADATA_JSON_CHARS:,} characters", param="metadata", code="invalid_metadata")
    try:
        return decode_json(value, what="metadata", param="metadata")
    except InvalidRequest:
        raise InvalidRequest(f"metadata must be a JSON object of strings, nested at most {MAX_JSON_DEPTH} levels", param="metadata", code="invalid_metadata") from None


def check_metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs", param="metadata", code="invalid_metadata")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > MAX_METADATA_CHARS:
            raise InvalidRequest(f"metadata keys must be strings of at most 64 characters and values strings of at most {MAX_METADATA_CHARS}", param="metadata", code="invalid_metadata")
    return dict(value)


async def accept_job(request: Request[Any, Any, Any], gw: Gateway, ctx: CallContext, job: ImageJob, *, route: str, base_url: str) -> Response[bytes]:
    """Validate the extras, check the job can be planned, store and queue it: 202."""
    settings = gw.config.settings
    extras = await _extras(request)
    webhook = None
    if "webhook_url" in extras:
        if gw.jobs.signing_key is None:
            raise InvalidRequest("webhooks are not configured on this gateway (KLEIN_WEBHOOK_SECRET is unset)", param="webhook_url", code="webhooks_disabled")
        webhook = Webhook(await vet_url(extras["webhook_url"], gw.jobs.allowlist, gw.resolver))
    metadata = check_metadata(extras.get("metadata"))
    deadline_s = deadline_for(request, settings.async_deadline_s, max(settings.max_deadline_s, settings.async_deadline_s))
    job = dataclasses.replace(job, deadline_s=deadline_s)
    plan = await gw.plan(job)
    if not plan.attempts:
        raise refusal(plan)
    now = time.time()
    record = JobRecord(id=new_job_id(now), owner=ctx.caller, route=route, job=job_to_dict(job), base_url=base_url, created=now, metadata=metadata, webhook=webhook)
    await gw.jobs.submit(record, gw.metrics)
    headers = {"location": f"/v1/images/jobs/{record.id}", "preference-applied": "respond-async", "x-request-id": ctx.request_id}
    return _job_response(record, status=202, headers=headers)


def _begin(request: Request[Any, Any, Any]) -> tuple[Gateway, CallContext]:
    gw = gateway_of(request)
    return gw, begin(request, gw)


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r}", param="id", code="job_not_found")


@get("/v1/images/jobs/{job_id:str}")
async def get_job(request: Request[Any, Any, Any], job_id: str) -> Response[bytes]:
    gw, ctx = _begin(request)
    record = await gw.jobs.owned(ctx.caller, job_id)
    if record is None:
        raise _not_found(job_id)
    return _job_response(record)


@get("/v1/images/jobs")
async def list_jobs(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw, ctx = _begin(request)
    params = request.query_params
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", param="status", code="invalid_value")
    try:
        limit = int(params.get("limit") or 20)
    except ValueError:
        raise InvalidRequest("limit must be an integer", param="limit", code="invalid_value") from None
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIST}", param="limit", code="invalid_value")
    after = params.get("after") or None
    records, more = await gw.jobs.list(ctx.caller, status=status, limit=limit, after=after)
    data = [r.public() for r in records]
    body = {"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": more}
    return Response(msgspec.json.encode(body), media_type=MediaType.JSON)


@post("/v1/images/jobs/{job_id:str}/cancel", status_code=200)
async def cancel_job(request: Request[Any, Any, Any], job_id: str) -> Response[bytes]:
    gw, ctx = _begin(request)
    record = await gw.jobs.cancel(ctx.caller, job_id, gw.fleet, gw.metrics)
    if record is None:
        raise _not_found(job_id)
    return _job_response(record)


def last_event_id(request: Request[Any, Any, Any]) -> int | None:
    """The `Last-Event-ID` an EventSource sends back when it reconnects; one we never sent counts as none."""
    value = (request.headers.get("last-event-id") or "").strip()
    return int(value) if value.isdigit() and len(value) <= 18 else None


@get("/v1/images/jobs/{job_id:str}/events")
async def job_events(request: Request[Any, Any, Any], job_id: str) -> Response[Any]:
    """Server-sent events: the job object at each change, `id:` its version and
    `event:` its status, ending after the terminal one (gateway/jobs/events.py).
    A caller already holding the terminal state (its `Last-Event-ID`) gets 204,
    which tells an EventSource to stop reconnecting."""
    gw, ctx = _begin(request)
    record = await gw.jobs.owned(ctx.caller, job_id)
    if record is None:
        raise _not_found(job_id)
    last = last_event_id(request)
    if caught_up(record, last):
        return Response(b"", status_code=204, headers={"x-request-id": ctx.request_id})
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "x-request-id": ctx.request_id}
    return Stream(_sse(gw, record, last), media_type="text/event-stream", headers=headers)


async def _sse(gw: Gateway, record: JobRecord, last: int | None) -> AsyncIterator[bytes]:
    """The stream's bytes. A caller who leaves cancels it where it waits (the
    store's wait ends with it); that counts as abandoned. A store that fails
    mid-stream ends it: the caller reconnects with its Last-Event-ID."""
    gw.metrics.open_job_event_stream()
    ended = False
    try:
        async for event in follow(gw.jobs.store, record, last, stop=lambda: gw.drain.draining):
            if event is None:
                yield b": keep-alive\n\n"
                continue
            version, job = event
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (version, str(job["status"]).encode(), msgspec.json.encode(job))
        ended = True
    except Exception as exc:  # noqa: BLE001 - the job store failed (Redis away): the stream ends, the caller resumes with Last-Event-ID
        ended = True
        log.warning("event stream of job %s ended by a store failure (%s)", record.id, type(exc).__name__)
    finally:
        gw.metrics.close_job_event_stream(abandoned=not ended)


ROUTES = [get_job, list_jobs, job_events, cancel_job]
