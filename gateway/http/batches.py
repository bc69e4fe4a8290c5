"""OpenAI's Batch API for images: create, quote, read, list, follow and cancel batches.

`POST /v1/batches` takes `input_file_id` (a `purpose=batch` file of the
caller's), `endpoint` (`/v1/images/generations` or `/v1/images/edits`),
`completion_window` (OpenAI's `24h`, or any whole number of minutes or hours
from 5m to 24h) and `metadata`, and answers the batch object at once, status
`validating`; the driver (gateway/batches/runner.py) does the rest.
`POST /v1/batches/quote` prices the same input without making a batch.
A batch is its creator's: to any other key it does not exist (404).

Each line's `body` is what the synchronous endpoint takes. An edit's
`images` may also hold `{"image_url": ...}` or `{"file_id": ...}` entries
(OpenAI's shapes); a file id names one of the caller's uploads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.response import Stream

from gateway.batches.model import BatchRecord, new_batch_id, window_seconds
from gateway.batches.runner import LineParser, local_prior_mp_s, quote_of
from gateway.dispatch.references import check_decodes, check_image_bytes, parse_reference
from gateway.domain.errors import InvalidRequest, NotFound
from gateway.domain.job import ImageJob, JobKind, ReferenceImage
from gateway.files import BATCH_URLS
from gateway.http.context import CallContext, json_object
from gateway.http.entry import base_url_of, begin, gateway_of
from gateway.http.jobs import check_metadata, last_event_id
from gateway.http.parse import build_job, parse_body

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("gateway.batches")
MAX_LIST, DEFAULT_LIST = 100, 20
EVENT_POLL_S = 0.5  # how often a batch's event stream looks for a change (the record is shared by every replica)
KEEP_ALIVE_S = 15.0
_DIGITS = re.compile(r"^[0-9]{1,4}$")


def line_parser(gw: Gateway) -> LineParser:
    """How the driver turns a line's body into the job the synchronous endpoint would have made."""

    async def parse(owner: str | None, url: str, body: dict[str, Any]) -> ImageJob:
        fields = dict(body)
        refs = [await _reference(gw, owner, value, f"images[{i}]") for i, value in enumerate(fields.pop("images", None) or [])]
        kind = JobKind.EDIT if url.endswith("/edits") else JobKind.GENERATE
        if kind is JobKind.EDIT and not refs:
            raise InvalidRequest("an edit needs `images`: 1 to 4 image URLs, data: URIs, {image_url} or {file_id} entries", param="images", code="missing_image")
        job = build_job(
            parse_body(fields),
            kind=kind,
            references=refs,
            max_prompt_chars=gw.config.settings.max_prompt_chars,
            deadline_s=gw.config.settings.async_deadline_s,
            caller=owner,
            known_backends=gw.fleet.names,
            request_id="",
            disabled_backends=gw.fleet.disabled,
        )
        if job.stream:
            raise InvalidRequest("stream=true has no meaning in a batch line", param="stream", code="unsupported_parameter")
        await asyncio.gather(*(asyncio.to_thread(check_decodes, r.data, f"images[{i}]") for i, r in enumerate(refs) if r.data is not None))
        return job

    return parse


async def _reference(gw: Gateway, owner: str | None, value: Any, param: str) -> ReferenceImage:
    if isinstance(value, dict) and set(value) == {"image_url"}:
        value = value["image_url"]
    if isinstance(value, dict) and set(value) == {"file_id"}:
        found = await gw.files.content(owner, str(value["file_id"]))
        if found is None:
            raise InvalidRequest(f"{param}: no file {value['file_id']!r} among this key's files", param=param, code="file_not_found")
        return check_image_bytes(found[1], param)
    return parse_reference(value, param)


def _json(body: dict[str, Any], status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=status, media_type=MediaType.JSON)


def _begin(request: Request[Any, Any, Any]) -> tuple[Gateway, CallContext]:
    gw = gateway_of(request)
    return gw, begin(request, gw)


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")


async def _input(gw: Gateway, ctx: CallContext, raw: dict[str, Any]) -> tuple[str, str, int, bytes]:
    """(endpoint, input_file_id, window in seconds, the file's bytes), checked."""
    endpoint = raw.get("endpoint")
    if endpoint not in BATCH_URLS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(BATCH_URLS)}", param="endpoint", code="invalid_value")
    window_s = window_seconds(raw.get("completion_window"))
    file_id = raw.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("input_file_id is required: the id of a purpose=batch file", param="input_file_id", code="missing_required_parameter")
    found = await gw.files.content(ctx.caller, file_id)
    if found is None:
        raise NotFound(f"no file {file_id!r}", param="input_file_id", code="file_not_found")
    record, data = found
    if record.purpose != "batch":
        raise InvalidRequest(f"file {file_id} was uploaded with purpose {record.purpose}; a batch's input needs purpose batch", param="input_file_id", code="invalid_file_purpose")
    return endpoint, file_id, window_s, data


@post("/v1/batches", status_code=200)
async def create_batch(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw, ctx = _begin(request)
    raw = await json_object(request)
    endpoint, file_id, window_s, _ = await _input(gw, ctx, raw)
    metadata = check_metadata(raw.get("metadata"))
    now = time.time()
    record = BatchRecord(
        id=new_batch_id(now),
        owner=ctx.caller,
        endpoint=endpoint,
        input_file_id=file_id,
        completion_window=str(raw["completion_window"]),
        window_s=window_s,
        created_at=int(now),
        base_url=base_url_of(request, gw),
        metadata=metadata,
    )
    await gw.batches.store.create(record)
    gw.batches.kick(record.id)
    return _json(record.public())


@post("/v1/batches/quote", status_code=200)
async def quote_batch(request: Request[Any, Any, Any]) -> Response[bytes]:
    """What the batch would cost, per line and in total, before any is made."""
    gw, ctx = _begin(request)
    raw = await json_object(request)
    endpoint, file_id, window_s, data = await _input(gw, ctx, raw)
    probe = BatchRecord(
        id=new_batch_id(), owner=ctx.caller, endpoint=endpoint, input_file_id=file_id, completion_window=str(raw["completion_window"]), window_s=window_s, created_at=int(time.time()), base_url=""
    )
    lines = await gw.batches.price(probe, data)
    return _json(
        {"object": "batch.quote", "endpoint": endpoint, "input_file_id": file_id, "completion_window": probe.completion_window, **quote_of(lines, window_s=window_s, rate_mp_s=local_prior_mp_s(gw))}
    )


async def _owned(gw: Gateway, ctx: CallContext, batch_id: str) -> BatchRecord:
    record = await gw.batches.store.get(batch_id)
    if record is None or record.owner != ctx.caller:
        raise _not_found(batch_id)
    return record


@get("/v1/batches/{batch_id:str}")
async def retrieve_batch(request: Request[Any, Any, Any], batch_id: str) -> Response[bytes]:
    gw, ctx = _begin(request)
    return _json((await _owned(gw, ctx, batch_id)).public())


@post("/v1/batches/{batch_id:str}/cancel", status_code=200)
async def cancel_batch(request: Request[Any, Any, Any], batch_id: str) -> Response[bytes]:
    """No new line starts; running ones are cancelled and settled; the files then hold what was done."""
    gw, ctx = _begin(request)
    await _owned(gw, ctx, batch_id)
    now = int(time.time())

    def cancel(r: BatchRecord) -> bool:
        if r.terminal or r.status == "cancelling":
            return False
        r.status, r.cancelling_at = "cancelling", now
        return True

    record = await gw.batches.store.update(batch_id, cancel)
    if record is None:
        raise _not_found(batch_id)
    if record.status in ("completed", "failed", "expired"):
        raise InvalidRequest(f"batch {batch_id} has already ended ({record.status}); there is nothing to cancel", param="batch_id", code="batch_not_cancellable")
    return _json(record.public())


@get("/v1/batches")
async def list_batches(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw, ctx = _begin(request)
    params = request.query_params
    raw_limit = params.get("limit") or str(DEFAULT_LIST)
    if not _DIGITS.match(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIST:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIST}", param="limit", code="invalid_value")
    records, more = await gw.batches.store.owned(ctx.caller, limit=int(raw_limit), after=params.get("after") or None)
    data = [r.public() for r in records]
    return _json({"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": more})


@get("/v1/batches/{batch_id:str}/events")
async def batch_events(request: Request[Any, Any, Any], batch_id: str) -> Response[Any]:
    """Server-sent events: the batch object at each change (`id:` its version,
    `event:` its status), ending after its terminal state; `Last-Event-ID` resumes."""
    gw, ctx = _begin(request)
    record = await _owned(gw, ctx, batch_id)
    last = last_event_id(request) or 0
    if record.terminal and record.version <= last:
        return Response(b"", status_code=204, headers={"x-request-id": ctx.request_id})
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "x-request-id": ctx.request_id}
    return Stream(_sse(gw, batch_id, last), media_type="text/event-stream", headers=headers)


async def _sse(gw: Gateway, batch_id: str, last: int) -> AsyncIterator[bytes]:
    quiet = time.monotonic()
    while not gw.drain.draining:
        try:
            record = await gw.batches.store.get(batch_id)
        except Exception as exc:  # noqa: BLE001 - the store is away: the stream ends, the caller resumes with Last-Event-ID
            log.warning("event stream of batch %s ended by a store failure (%s)", batch_id, type(exc).__name__)
            return
        if record is None:
            return
        if record.version > last:
            last, quiet = record.version, time.monotonic()
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (record.version, record.status.encode(), msgspec.json.encode(record.public()))
            if record.terminal:
                return
        elif time.monotonic() - quiet > KEEP_ALIVE_S:
            quiet = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(EVENT_POLL_S)


ROUTES = [create_batch, quote_batch, list_batches, retrieve_batch, cancel_batch, batch_events]
