"""The OpenAI Images surface: generations, edits, models, and served files.

Handlers only parse and validate into an ImageJob, call the gateway, and
shape the answer as the OpenAI SDK expects (https://github.com/openai/openai-python,
`types/images_response.py`). Nothing after `build_job` knows which wire shape was used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException

from gateway.dispatch.answer import images_body, klein_headers
from gateway.dispatch.attempts import DispatchFailed
from gateway.dispatch.followup import FOLLOW_UP_S
from gateway.dispatch.progress import Progress
from gateway.dispatch.references import MAX_REFERENCE_BYTES, check_decodes, check_image_bytes, parse_reference
from gateway.dispatch.shutdown import ShuttingDown
from gateway.domain.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from gateway.domain.job import ImageJob, JobKind, ReferenceImage
from gateway.domain.models import ALIASES, MODEL_ID, echo, model_object, resolve_model
from gateway.http.context import CallContext, decode_json, form_of, json_object
from gateway.http.entry import base_url_of, begin, gateway_of
from gateway.http.followups import HOLD_SLACK_S, follow_up
from gateway.http.jobs import accept_job, prefers_async
from gateway.http.parse import build_job, parse_body
from gateway.http.served import CALLER_GONE, Served, caller_gone, mark_caller_gone, note_failure, settle
from gateway.http.streaming import start_stream
from gateway.images import valid_name
from gateway.routing.pricing import usd_text
from gateway.service import Gateway

IMAGE_FIELDS = ("image", "image[]") + tuple(f"image[{i}]" for i in range(8))

JobBuilder = Callable[[Request[Any, Any, Any], Gateway, CallContext], Awaitable[ImageJob]]


async def run_images(request: Request[Any, Any, Any], route: str, build: JobBuilder) -> Response[Any]:
    """The shared path of generations and edits: job, dispatch, answer, metrics, log.

    A `stream: true` request leaves here once its route is chosen and priced
    (gateway/http/streaming.py): the stream holds its place in flight and
    settles it, through the same `settle`, when its work ends."""
    gw = gateway_of(request)
    rec = Served(route)
    with contextlib.ExitStack() as held:
        held.enter_context(gw.metrics.in_flight())
        admitted = held.enter_context(gw.admission())
        try:
            ctx = begin(request, gw)
            rec.tab = tab = gw.billing.tab(ctx.key, ctx.request_id, route)  # from here on, the request has its ledger row
            if not admitted:
                raise GatewayError("the gateway is at capacity; retry shortly", status=503, code="gateway_busy", retryable=True, retry_after=1)
            respond_async = prefers_async(request)
            async with gw.idempotency.guard(request, ctx.caller, respond_async=respond_async, running_ttl_s=ctx.deadline_s + 60) as once:
                if once.replay is not None:
                    rec.status = once.replay.status_code or 200
                    once.replay.headers["x-request-id"] = ctx.request_id
                    return once.replay
                # An answer kept for replay keeps its stored images as long (docs: README, Idempotency keys).
                keep = gw.config.settings.images_kept_s(gw.idempotency.ttl_s) if once.claimed else None
                try:
                    built = await build(request, gw, ctx)
                    if built.stream:  # before the rate limit counts it
                        refuse_with_stream(respond_async=respond_async, keyed=once.claimed)
                    rec.job = job = await tab.admit(built)
                    if job.stream:
                        return await start_stream(request, gw, rec, held, base_url=base_url_of(request, gw))
                    if respond_async:
                        rec.status = 202
                        return once.keep(await accept_job(request, gw, ctx, job, route=route, base_url=base_url_of(request, gw)))
                    work = gw.images(job, started=rec.started, base_url=base_url_of(request, gw), tab=tab, keep_images_s=keep, progress=rec.progress)
                    outcome = await until_done_or_abandoned(request, work, rec.progress)
                except GatewayError as err:
                    note_failure(request, err, tab, rec.progress)  # before the idempotency guard keeps the answer
                    if isinstance(err, DispatchFailed) and err.unsettled and rec.job is not None:
                        # The deadline passed while a provider job ran: answer now, settle when it ends.
                        await once.defer(FOLLOW_UP_S + HOLD_SLACK_S)
                        gone = CALLER_GONE if caller_gone(request) else err.status
                        follow_up(gw, err, tab=tab, once=once, job=rec.job, request_id=ctx.request_id, status=gone, base_url=base_url_of(request, gw), keep_images_s=keep)
                        rec.deferred = True
                    raise
                rec.served(outcome)
                return once.keep(Response(msgspec.json.encode(images_body(job, outcome)), media_type=MediaType.JSON, headers={**klein_headers(ctx.request_id, outcome), **tab.headers}))
        except DispatchFailed as err:
            rec.failed(err)
            note_failure(request, err, rec.tab)
            raise
        except (GatewayError, HTTPException) as err:
            # HTTPException: litestar's own (broken multipart, body over the limit), counted by its real status.
            rec.status = err.status if isinstance(err, GatewayError) else err.status_code
            if isinstance(err, GatewayError):
                note_failure(request, err, rec.tab)
            raise
        finally:
            if not rec.streaming:
                await settle(request, gw, rec)


def refuse_with_stream(*, respond_async: bool, keyed: bool) -> None:
    """What a stream cannot be combined with (docs/design.md#streaming)."""
    if respond_async:
        raise InvalidRequest("stream=true cannot be combined with Prefer: respond-async; follow an async job at /v1/jobs/{id} instead", param="stream", code="unsupported_parameter")
    if keyed:
        raise InvalidRequest("stream=true cannot be combined with an Idempotency-Key: a stream is not kept for replay; send one or the other", param="Idempotency-Key", code="unsupported_parameter")


async def until_done_or_abandoned(request: Request[Any, Any, Any], work: Awaitable[Any], progress: Progress) -> Any:
    """Run `work`; if the caller disconnects first, stop it only while that costs nothing.

    Before dispatch hands the work to a provider (parsing, planning,
    reserving), a disconnect cancels it: 499, nothing spent. Once an attempt
    has called a provider it may bill, so the work runs on to its end as if
    the caller had stayed: the handler settles the budget, the ledger, the
    metrics and the Idempotency-Key with the real outcome (a retry with the
    key replays the image instead of paying again; docs/design.md#abandoned-requests).
    The drain keeps tracking it, so a graceful shutdown waits for it within its
    grace and cancels it only after. The body has been read by now, so the next
    ASGI message can only be the disconnect."""
    drain = gateway_of(request).drain
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    with drain.tracking(task):
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and progress.handed_over:
                mark_caller_gone(request)
                await asyncio.wait({task})  # to its end, settled as if the caller had stayed
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # let dispatch cancel the provider job before answering
        if task.cancelled() and drain.stopped(task):
            request.state.klein_headers["connection"] = "close"
            if progress.possibly_billed:  # a provider job was cut mid-way: the Idempotency-Key keeps this answer
                request.state.klein_headers["x-klein-possibly-billed-usd"] = usd_text(progress.possibly_billed)
            raise ShuttingDown("the gateway shut down before this request finished; its provider job was cancelled; retry", retry_after=1)
    if task.cancelled():
        raise GatewayError("the caller closed the connection", status=499, code="client_closed_request")
    return task.result()


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _generation_job(request: Request[Any, Any, Any], gw: Gateway, ctx: CallContext) -> ImageJob:
    raw = await json_object(request)
    return await _pixels_checked(_job_from_raw(raw, gw, ctx, JobKind.GENERATE))


async def _pixels_checked(job: ImageJob, uploads: int = 0) -> ImageJob:
    """Decode every reference the gateway holds bytes of, in worker threads
    (a decode can take a second): a broken file is refused before any backend
    sees it. The first `uploads` references came as multipart files."""
    checks = [
        asyncio.to_thread(check_decodes, ref.data, "image" if i < uploads else f"images[{i - uploads}]")
        for i, ref in enumerate(job.references)
        if ref.data is not None
    ]  # fmt: skip
    await asyncio.gather(*checks)
    return job


def _job_from_raw(raw: dict[str, Any], gw: Gateway, ctx: CallContext, kind: JobKind, uploads: list[ReferenceImage] | None = None, *, form: bool = False) -> ImageJob:
    body = parse_body(raw, form=form)
    refs = list(uploads or [])
    for i, value in enumerate(body.images or []):
        refs.append(parse_reference(value, f"images[{i}]"))
    if refs:
        kind = JobKind.EDIT
    return build_job(
        body,
        kind=kind,
        references=refs,
        max_prompt_chars=gw.config.settings.max_prompt_chars,
        deadline_s=ctx.deadline_s,
        caller=ctx.caller,
        known_backends=gw.fleet.names,
        request_id=ctx.request_id,
        disabled_backends=gw.fleet.disabled,
    )


async def _edit_job(request: Request[Any, Any, Any], gw: Gateway, ctx: CallContext) -> ImageJob:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await json_object(request)
        if not raw.get("images"):
            raise InvalidRequest("an edit needs `images`: 1 to 4 image URLs or data: URIs", param="images", code="missing_image")
        return await _pixels_checked(_job_from_raw(raw, gw, ctx, JobKind.EDIT))
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UnsupportedMediaType("send multipart/form-data with `image` files, or JSON with `images`")
    form = await form_of(request)
    fields: dict[str, Any] = {}
    uploads: list[ReferenceImage] = []
    for key, value in form.multi_items():
        if key in IMAGE_FIELDS:
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"{key} must be a file upload", param="image", code="invalid_image")
            uploads.append(check_image_bytes(await read_upload(value, "image"), "image"))
        elif key == "mask":
            raise InvalidRequest("mask is not supported: FLUX.2 [klein] edits from reference images, not masks", param="mask", code="unsupported_parameter")
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"unexpected file field {key!r}; send images as image, image[] or image[0..3]", param=key, code="invalid_image")
        elif key == "provider":
            fields[key] = decode_json(value, what="provider", param="provider")
        elif key.startswith("images"):
            fields.setdefault("images", []).append(value)
        else:
            fields[key] = value
    if not uploads and not fields.get("images"):
        raise InvalidRequest("an edit needs 1 to 4 images: send them as image, image[] or image[0..3]", param="image", code="missing_image")
    return await _pixels_checked(_job_from_raw(fields, gw, ctx, JobKind.EDIT, uploads, form=True), len(uploads))


UPLOAD_CHUNK_BYTES = 1024 * 1024


async def read_upload(upload: UploadFile, param: str) -> bytes:
    """An uploaded file's bytes, read in chunks and stopped one byte past the
    per-image cap, so an oversized part is refused without holding all of it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await upload.read(min(UPLOAD_CHUNK_BYTES, MAX_REFERENCE_BYTES + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REFERENCE_BYTES:
            raise PayloadTooLarge(f"uploaded image is over {MAX_REFERENCE_BYTES:,} bytes; the limit is {MAX_REFERENCE_BYTES:,} per image", param=param)
        chunks.append(chunk)


@post("/v1/images/generations", status_code=200)
async def generations(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await run_images(request, "generations", _generation_job)


@post("/v1/images/edits", status_code=200)
async def edits(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await run_images(request, "edits", _edit_job)


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw = gateway_of(request)
    begin(request, gw)
    data = [model_object()] + [model_object(f"{name}/{MODEL_ID}") for name in sorted(gw.fleet.backends)]
    return Response(msgspec.json.encode({"object": "list", "data": data}), media_type=MediaType.JSON)


@get("/v1/models/{model_id:path}")
async def get_model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
    gw = gateway_of(request)
    begin(request, gw)
    model_id = model_id.lstrip("/")
    resolved = resolve_model(model_id, set(gw.fleet.backends))
    if resolved is False:
        raise NotFound(f"model {echo(model_id)!r} does not exist", param="model", code="model_not_found")
    shown = MODEL_ID if model_id.lower() in ALIASES else model_id
    return Response(msgspec.json.encode(model_object(shown)), media_type=MediaType.JSON)


@get("/v1/images/files/{name:str}")
async def image_file(request: Request[Any, Any, Any], name: str, expires: int = 0, sig: str = "") -> Response[bytes]:
    """Images the gateway serves itself; the signed URL is the credential.

    Any worker or replica sharing the store and its signing key answers it."""
    store = gateway_of(request).images_store
    item = None
    if valid_name(name) and store.signer.verify(name, expires, sig) and not store.expired(expires):
        item = await store.get(name)
    if item is None:
        raise NotFound("image not found or its URL expired", code="image_not_found")
    max_age = max(0, item.expires_at - int(time.time()))
    return Response(item.data, media_type=item.content_type, headers={"cache-control": f"private, max-age={max_age}"})


ROUTES = [generations, edits, list_models, get_model, image_file]
