"""`stream: true` on /v1/images/generations and /v1/images/edits: the answer as server-sent events.

The events are OpenAI's, field for field (openai-python `types/image_gen_*_event.py`,
`image_edit_*_event.py`): `image_generation.completed` (`image_edit.completed`
for an edit) carries each image as `b64_json`, then the stream ends; an
`error` event carrying the OpenAI error envelope ends a stream whose work
failed. Two additions a client may ignore: `image_index` (which of the `n`
images, in order) and `klein` (the request's backend, cost and attempts: what
the x-klein-* headers say on a plain answer, whose headers a stream sends
before they are known). While the work runs the stream says how it is doing
in SSE comment lines (`: progress {...}`, `: keep-alive`), which every SSE
parser skips: the provider's queue status and position, where it reports them.

The route is chosen and priced (budget reserved) before the first byte, so a
refusal is an ordinary HTTP error; from then on the answer is 200 and every
ending is an event. Failover happens inside dispatch, before any event, so
the caller sees only the backend that served it. The work runs in its own
task, not in the response's: a caller who disconnects mid-stream stops it
only while nothing was handed to a provider (as a plain request,
docs/design.md#abandoned-requests), and the request is settled by the same
`settle` as a plain answer (gateway/http/served.py), once, when the work ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from litestar import Request
from litestar.response import Stream

from gateway.dispatch.answer import images_body, klein_headers
from gateway.dispatch.attempts import DispatchFailed, Outcome, tried
from gateway.dispatch.shutdown import ShuttingDown
from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob, JobKind
from gateway.http.followups import follow_up
from gateway.http.served import CALLER_GONE, Served, caller_gone, mark_caller_gone, settle
from gateway.money.idempotency import Once
from gateway.providers.base import PreviewImage, PreviewSink, preview_sink, progress_listener
from gateway.routing.plan import Plan
from gateway.routing.pricing import usd_text
from gateway.service import Gateway

log = logging.getLogger(__name__)

KEEPALIVE_S = 10.0  # a comment at least this often while the work runs, so proxies keep the connection
MEDIA_TYPE = "text/event-stream"
# OpenAI's completed event always has `usage` (token counts of its GPT image
# models); FLUX.2 [klein] is not billed by tokens, so every count is 0.
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0, "total_tokens": 0}
BACKGROUND = "opaque"  # what FLUX.2 [klein] renders (background=transparent is refused)
QUALITY = "auto"  # the distilled model has one quality


def event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def comment(text: str) -> bytes:
    """An SSE comment line: ignored by every SSE parser, the OpenAI SDKs' included."""
    return b": " + text.replace("\n", " ").replace("\r", " ").encode() + b"\n\n"


def event_prefix(job: ImageJob) -> str:
    return "image_edit" if job.kind is JobKind.EDIT else "image_generation"


def klein_figures(request_id: str, outcome: Outcome) -> dict[str, Any]:
    """The x-klein-* headers of a plain answer as an object: the same figures, by construction."""
    figures: dict[str, Any] = {name.removeprefix("x-klein-").replace("-", "_"): value for name, value in klein_headers(request_id, outcome).items() if name.startswith("x-klein-")}
    figures["attempts"] = outcome.tried
    figures["request_id"] = request_id
    return figures


def completed_events(job: ImageJob, outcome: Outcome, request_id: str, created: int) -> list[bytes]:
    """One completed event per image, in order; each carries the request's `klein` figures (totals, not shares)."""
    body = images_body(job, outcome, created)
    klein = klein_figures(request_id, outcome)
    name = f"{event_prefix(job)}.completed"
    out = []
    for index, item in enumerate(body["data"]):
        data = {
            "type": name,
            "b64_json": item.get("b64_json", ""),
            "size": item["size"],
            "output_format": job.output_format,
            "quality": QUALITY,
            "background": BACKGROUND,
            "created_at": created,
            "usage": USAGE,
            "image_index": index,
            "klein": klein,
        }
        out.append(event(name, data))
    return out


def error_event(err: GatewayError, request_id: str) -> bytes:
    """The OpenAI error envelope as an `error` event (the SDKs raise it as an APIError), with what was spent."""
    data: dict[str, Any] = {"type": "error", **err.envelope()}
    klein: dict[str, Any] = {"request_id": request_id, "status": err.status, "cost_usd": "0", "attempts": 0}
    if isinstance(err, DispatchFailed):
        klein.update(cost_usd=usd_text(err.cost_usd), attempts=tried(err.attempts))
        if err.possibly_billed_usd:
            klein["possibly_billed_usd"] = usd_text(err.possibly_billed_usd)
    data["klein"] = klein
    return event("error", data)


async def start_stream(request: Request[Any, Any, Any], gw: Gateway, rec: Served, held: contextlib.ExitStack, *, base_url: str) -> Stream:
    """Route and price the job (a refusal raises, an HTTP error as usual), then
    answer with the stream. From here the stream owns the request: `held` (its
    place in flight) and the settlement go with it."""
    assert rec.job is not None and rec.tab is not None
    plan = await gw.routed(rec.job, rec.tab)
    stream = ImageStream(request, gw, rec, plan, base_url)
    stream.begin(held.pop_all())
    rec.streaming = True
    request.scope.setdefault("state", {})["klein_observed"] = True
    headers = {**getattr(request.state, "klein_headers", {}), **rec.tab.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
    chosen = plan.chosen
    if chosen is not None:  # the plan's first choice and its quote: failover may still change both (the completed event says)
        headers["x-klein-planned-backend"] = chosen.name
        if chosen.quote is not None:
            headers["x-klein-quote-usd"] = usd_text(chosen.quote.usd)
    return Stream(stream.events(), media_type=MEDIA_TYPE, headers=headers)


class ImageStream:
    """One streamed request: its dispatch, the events it has for the caller, its settlement."""

    def __init__(self, request: Request[Any, Any, Any], gw: Gateway, rec: Served, plan: Plan, base_url: str) -> None:
        assert rec.job is not None
        self.request, self.gw, self.rec, self.plan, self.base_url = request, gw, rec, plan, base_url
        self.job: ImageJob = rec.job
        self.request_id = self.job.request_id
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.work: asyncio.Task[Outcome] | None = None
        self.ended = False  # every event is queued: a caller leaving now left after its answer
        self._said: Mapping[str, Any] | None = None
        self.previews = 0  # partial images sent
        self._imaged = False  # an image event (preview or completed) has been queued

    def begin(self, held: contextlib.ExitStack) -> None:
        token = progress_listener.set(self._progress)  # the dispatch task's context inherits both
        sink = preview_sink.set(PreviewSink(self.job.partial_images, self._preview) if self.job.partial_images else None)
        try:
            self.work = asyncio.ensure_future(
                self.gw.dispatch(self.job, self.plan, started=self.rec.started, base_url=self.base_url, tab=self.rec.tab, progress=self.rec.progress)
            )  # fmt: skip
        finally:
            preview_sink.reset(sink)
            progress_listener.reset(token)
        self.gw.drain.track(self.work)  # a graceful shutdown waits for it within its grace, then cancels it
        runner = asyncio.get_running_loop().create_task(self._run(held))
        self.gw.follow_ups.add(runner)  # the gateway closes its ledger only after this request is settled
        runner.add_done_callback(self.gw.follow_ups.discard)

    def _preview(self, preview: PreviewImage) -> None:
        """A backend's partial image (the local GPU's denoising loop), as OpenAI's partial_image event."""
        name = f"{event_prefix(self.job)}.partial_image"
        data = {
            "type": name,
            "b64_json": base64.b64encode(preview.data).decode(),
            "partial_image_index": preview.partial_image_index,
            "size": f"{preview.width}x{preview.height}" if preview.width and preview.height else self.job.size,
            "output_format": self.job.output_format,
            "quality": QUALITY,
            "background": BACKGROUND,
            "created_at": int(time.time()),
            "image_index": preview.index,
        }
        self.previews += 1
        self._image_event(preview=True)
        self.queue.put_nowait(event(name, data))

    def _image_event(self, *, preview: bool) -> None:
        """Count an image event for the dashboards: the first one's delay, and previews."""
        first, self._imaged = not self._imaged, True
        self.gw.metrics.observe_stream_event(route=self.rec.route, since_start_s=time.monotonic() - self.rec.started, first=first, preview=preview)

    def _progress(self, backend: str, fields: Mapping[str, Any]) -> None:
        if fields != self._said:
            self._said = fields
            self.queue.put_nowait(comment("progress " + msgspec.json.encode({"backend": backend, **fields}).decode()))

    async def events(self) -> AsyncIterator[bytes]:
        """What the response sends. When it stops early the caller has gone:
        the work stops only if no provider has it yet; it is settled either way."""
        try:
            while True:
                chunk = await self.queue.get()
                if chunk is None:
                    return
                yield chunk
        finally:
            if not self.ended:
                self.gw.metrics.record_stream_ended_early(route=self.rec.route)
                mark_caller_gone(self.request)
                if self.work is not None and not self.rec.progress.handed_over:
                    self.work.cancel()  # nothing was sent to a provider: nothing is spent (499)

    async def _run(self, held: contextlib.ExitStack) -> None:
        rec, events = self.rec, []
        with held:
            try:
                outcome = await self._outcome()
                rec.served(outcome)
                events = completed_events(self.job, outcome, self.request_id, int(time.time()))
                self._image_event(preview=False)
            except DispatchFailed as err:
                rec.failed(err)
                if err.unsettled and rec.tab is not None:  # the deadline passed while a provider job ran: settled when it ends
                    status = CALLER_GONE if caller_gone(self.request) else err.status
                    follow_up(self.gw, err, tab=rec.tab, once=Once(), job=self.job, request_id=self.request_id, status=status, base_url=self.base_url, keep_images_s=None)
                    rec.deferred = True
                events = [error_event(err, self.request_id)]
            except GatewayError as err:
                rec.status = err.status
                events = [error_event(err, self.request_id)]
            except Exception as exc:  # a bug must still settle and end the stream
                log.exception("streamed request %s failed: %s", self.request_id, type(exc).__name__)
                internal = GatewayError("internal error; the request id is in the event's klein.request_id", status=500, code="internal_error")
                internal.type = "server_error"
                events = [error_event(internal, self.request_id)]
            finally:
                await settle(self.request, self.gw, rec)  # before the answer goes out, as a plain answer's
        for chunk in events:
            self.queue.put_nowait(chunk)
        self.ended = True
        self.queue.put_nowait(None)

    async def _outcome(self) -> Outcome:
        work = self.work
        assert work is not None
        try:
            while not work.done():
                done, _ = await asyncio.wait({work}, timeout=KEEPALIVE_S)
                if not done:
                    self.queue.put_nowait(comment("keep-alive"))
        except asyncio.CancelledError:
            # The gateway is closing past its grace: stop the work, keep what it spent.
            work.cancel()
            await asyncio.wait({work})
            raise ShuttingDown("the gateway shut down before this request finished; its provider job was cancelled; retry", retry_after=1) from None
        if work.cancelled():
            if self.gw.drain.stopped(work):
                raise ShuttingDown("the gateway shut down before this request finished; its provider job was cancelled; retry", retry_after=1)
            raise GatewayError("the caller closed the connection", status=CALLER_GONE, code="client_closed_request")
        return work.result()
