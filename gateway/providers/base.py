"""The one small interface every backend adapter implements.

An adapter translates an `ImageJob` into one provider's wire protocol and back
into a provider-neutral `ProviderResult`. It knows nothing about pricing,
routing or other providers. Every failure leaves an adapter as a
`ProviderError` whose `failure` class says what it means for billing and
health (docs/design.md#failure-classes); dispatch decides what to do with it.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar

import httpx

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import ImageJob, JobKind
from gateway.net.wire import Wire, WireResponse, WireTimeout, as_wire
from gateway.providers._json import encode_json, response_json
from gateway.providers.options import AdapterOptions

log = logging.getLogger(__name__)

GATEWAY_OVERLOADED = "gateway_overloaded"  # ProviderError.code when the gateway, not the backend, was slow
DELIVERY_NETWORK = "delivery_network"  # ProviderError.code: the gateway could not fetch a finished image
CALLER_DEADLINE = "caller_deadline"  # ProviderError.code: a timeout the caller's short deadline caused (gateway/dispatch/blame.py)


class FailureClass(StrEnum):
    """What a failure means for billing and for the backend's health."""

    UNREACHABLE = "unreachable"  # never reached the provider: connect, DNS, TLS, refused
    REFUSED = "refused"  # refused before any work: 429, 503, 402, 401/403
    REJECTED = "rejected"  # the provider rejected the input: 400/422
    FAILED = "failed"  # the provider tried and failed: 5xx, status failed, garbage body
    UNKNOWN_OUTCOME = "unknown_outcome"  # submitted (job id exists), then timeout/reset
    CONTENT_FILTERED = "content_filtered"  # every image flagged by the safety checker
    # The generation succeeded (and is billed), then its images could not be
    # delivered: download failed, wrong size, undecodable, too few images.
    DELIVERY_FAILED = "delivery_failed"


@dataclass(eq=False)
class ProviderError(Exception):
    """A classified failure of one attempt on one backend.

    `message` is for the operator's log: adapters mask credentials, auth
    headers and the provider's internal URLs in it, but it may quote the
    provider, so callers get `caller_text.caller_message_of` instead.
    """

    failure: FailureClass
    message: str
    status: int | None = None
    retry_after: float | None = None
    job_id: str | None = None
    billed: bool = False  # the provider may charge for this attempt
    credentials_invalid: bool = False  # 401/403: the backend is down until fixed
    code: str | None = None  # the provider's own error code, if any

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.failure}: {self.message}"


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One output image: a URL the provider serves, or the bytes themselves."""

    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    nsfw: bool | None = None  # None: not checked
    seed: int | None = None
    b64: str | None = None  # the provider's own base64, passed through to b64_json callers when it fits
    b64_head: bytes | None = field(default=None, compare=False, repr=False)  # b64's first HEAD_B64_CHARS, decoded and checked (_images.checked_b64)


@dataclass(slots=True)
class ProviderResult:
    images: list[GeneratedImage]
    seed: int | None = None
    job_id: str | None = None
    reported_cost_usd: Decimal | None = None  # the provider's own figure, where it reports one
    raw: Mapping[str, Any] = field(default_factory=dict)  # for debugging; never logged whole


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of a free health probe. Probes never generate a paid image."""

    ok: bool
    detail: str = ""
    latency_s: float | None = None
    live: Mapping[str, Any] = field(default_factory=dict)  # e.g. local queue wait, live cost
    credentials_invalid: bool = False  # the provider refused the key (401/403)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    request: float = 60.0  # one HTTP exchange (read), e.g. Replicate's Prefer: wait
    poll_interval: float = 0.25  # first poll delay; grows up to max_poll_interval
    max_poll_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    """What an adapter is built from; comes from providers.yaml and the environment."""

    name: str
    base_url: str
    credential: str | None
    timeouts: Timeouts = Timeouts()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EmulatorHook:
    """How the emulator launcher serves a provider on loopback: its ASGI app
    class (`module:Class`, imported only when an emulator starts) and the
    prefix of the random keys it hands out (shaped like the real ones, so a
    prefix check is satisfied; ignored for a provider without a credential)."""

    app: str
    key_prefix: str = "emu-"


class Adapter(ABC):
    """Base of every provider adapter. Subclasses set `kind` and implement
    `generate` and `probe`; `cancel` is optional (not every provider has one).

    The class attributes are everything the rest of the gateway knows about a
    provider (config, logs, the emulator launcher, routing and health read
    them through `gateway.providers`), so no other module names it."""

    kind: ClassVar[str]
    # The variable holding the key; None: no credential (a service addressed
    # by URL alone, such as the local GPU). providers.yaml may rename it.
    credential_env: ClassVar[str | None] = None
    # The variable that overrides the base URL, and the URL without it; None:
    # no default, so the backend is disabled until the variable is set.
    base_url_env: ClassVar[str]
    default_base_url: ClassVar[str | None] = None
    options_type: ClassVar[type[AdapterOptions]] = AdapterOptions
    default_capabilities: ClassVar[Capabilities]
    # Its probe reports a queue wait that routing spills on, so a 429 only
    # means "full for this request": it neither parks nor counts against health.
    reports_queue_wait: ClassVar[bool] = False
    # Its probe reports a live per-image price that replaces the price sheet's figure.
    reports_live_price: ClassVar[bool] = False
    # References go on the wire as bytes: the gateway fetches a caller's URL
    # first, whatever providers.yaml `capabilities:` says.
    takes_reference_bytes: ClassVar[bool] = False
    # It sends partial images to a `preview_sink` set around `generate`; the
    # others ignore the sink (a caller then gets the final image alone).
    sends_previews: ClassVar[bool] = False
    emulator: ClassVar[EmulatorHook | None] = None

    def __init__(self, settings: AdapterSettings, wire: Wire | httpx.AsyncClient) -> None:
        self.settings = settings
        self.wire = as_wire(wire)
        self.opts = self.options_type.parse(settings.options, self.kind)

    @classmethod
    def capabilities_for(cls, options: Mapping[str, Any] | None = None, kind: JobKind | None = None) -> Capabilities:
        """What the backend can do for one kind of job (None: text-to-image)
        under these options. The default ignores both; an adapter whose
        options or endpoints change its limits overrides it."""
        cls.options_type.parse(options, cls.kind)
        return cls.default_capabilities

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def base(self) -> str:
        """The configured base URL, without a trailing slash."""
        return self.settings.base_url.rstrip("/")

    @abstractmethod
    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        """Run the job; `deadline` is a `time.monotonic()` instant.

        Raises `ProviderError` for every failure. Past the deadline with a job
        id in hand, raise UNKNOWN_OUTCOME carrying that id."""

    @abstractmethod
    async def probe(self) -> ProbeResult:
        """A health check that costs nothing (never a generation)."""

    async def cancel(self, job_id: str) -> bool | None:
        """Ask the provider to cancel a submitted job: True if it confirmed the
        cancel (nothing is billed), False if it refused or did not answer (the
        job may still run and be billed), None if this provider has no cancel."""
        return None

    resumable: ClassVar[bool] = False  # True where `resume` can follow a job submitted earlier

    async def resume(self, job: ImageJob, job_ids: Sequence[str], deadline: float) -> ProviderResult:
        """Follow jobs an earlier process submitted for `job` (ids it noted) to
        their result, without submitting anything: how a replica that claims
        a crashed replica's async job avoids paying for it twice."""
        raise ProviderError(FailureClass.FAILED, f"{self.kind} jobs cannot be resumed")

    def sizes_to_verify(self, images: list[GeneratedImage], job: ImageJob) -> list[GeneratedImage]:
        """The images with the sizes the gateway may trust under `verify_size`.

        A width and height left on an image are trusted (a URL then goes to
        the caller unread); None makes the result shaper read the header.
        `off` stamps the requested size, `header` clears any, `reported`
        keeps what the provider's answer reported."""
        policy = getattr(self.opts, "verify_size", "header")
        if policy == "off":
            return [replace(img, width=job.width, height=job.height) for img in images]
        if policy == "header":
            return [replace(img, width=None, height=None) for img in images]
        return images

    # ---- helpers shared by HTTP adapters -------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        job_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
    ) -> WireResponse:
        """One HTTP exchange on the wire, with transport errors classified.
        `json` is sent encoded by msgspec; no redirect is followed.

        Before a job id exists a transport failure is UNREACHABLE (connect) or
        FAILED (the request may have reached the provider but nothing was
        created we know of). With a job id it is UNKNOWN_OUTCOME.

        `stream=True` returns once the headers arrived, the body unread: the
        caller reads it (classifying errors as `stream_read_error` does) and
        closes the response."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_error(job_id)
        read = min(timeout or self.settings.timeouts.request, remaining)
        connect = min(self.settings.timeouts.connect, remaining)
        sent = headers or {}
        if json is not None:
            content = encode_json(json)
            sent = {**sent, "content-type": "application/json"}
        started = time.monotonic()
        try:
            return await self.wire.send(method, url, headers=sent, content=content, timeout=WireTimeout(read=read, connect=connect), stream=stream)
        except httpx.ConnectTimeout:
            if time.monotonic() - started > 2 * connect + 1.0:
                # The timer fired long after it was due: the gateway's own event loop
                # was saturated, which says nothing about the backend's health.
                raise ProviderError(FailureClass.UNREACHABLE, "the gateway was too busy to connect in time", code=GATEWAY_OVERLOADED, job_id=job_id) from None
            if job_id:
                raise ProviderError(FailureClass.UNKNOWN_OUTCOME, "connection lost while following job: ConnectTimeout", job_id=job_id, billed=True) from None
            raise ProviderError(FailureClass.UNREACHABLE, "could not connect: ConnectTimeout") from None
        except httpx.ConnectError as exc:
            if job_id:
                raise ProviderError(FailureClass.UNKNOWN_OUTCOME, f"connection lost while following job: {type(exc).__name__}", job_id=job_id, billed=True) from None
            raise ProviderError(FailureClass.UNREACHABLE, f"could not connect: {type(exc).__name__}") from None
        except httpx.TimeoutException as exc:
            if job_id:
                raise ProviderError(FailureClass.UNKNOWN_OUTCOME, f"timed out following job: {type(exc).__name__}", job_id=job_id, billed=True) from None
            raise ProviderError(FailureClass.UNKNOWN_OUTCOME, f"timed out waiting for the provider: {type(exc).__name__}", billed=True) from None
        except httpx.TransportError as exc:
            if job_id:
                raise ProviderError(FailureClass.UNKNOWN_OUTCOME, f"connection broke while following job: {type(exc).__name__}", job_id=job_id, billed=True) from None
            raise ProviderError(FailureClass.FAILED, f"connection broke: {type(exc).__name__}") from None


def stream_read_error(exc: Exception) -> ProviderError:
    """A transport failure while reading a streamed body (no job id), classified
    as `Adapter.request` classifies one while reading a whole body: a timeout
    is UNKNOWN_OUTCOME (the work may have run), a broken connection FAILED."""
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        name = type(exc).__name__ if isinstance(exc, httpx.TimeoutException) else "ReadTimeout"
        return ProviderError(FailureClass.UNKNOWN_OUTCOME, f"timed out waiting for the provider: {name}", billed=True)
    return ProviderError(FailureClass.FAILED, f"connection broke: {type(exc).__name__}")


@dataclass(frozen=True, slots=True)
class PreviewImage:
    """One partial image of a running generation: image `index` of the job,
    its `partial_image_index`-th preview (0, 1, ...). Smaller than the final
    image; `content_type` is the job's output format."""

    data: bytes
    index: int
    partial_image_index: int
    content_type: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class PreviewSink:
    """Where an adapter that `sends_previews` puts partial images: up to
    `partial_images` (1-3) per image, each passed to `send` as it arrives and
    before `generate` returns. `send` may be a plain function or a coroutine
    function; what it raises is logged and never fails the generation."""

    partial_images: int
    send: Callable[[PreviewImage], Awaitable[None] | None]


# Set around `generate` by a caller that streams partial images (a ContextVar,
# like `submitted_jobs`, so no adapter signature changes). None: no previews,
# and every adapter sends exactly what it sends without this.
preview_sink: ContextVar[PreviewSink | None] = ContextVar("preview_sink", default=None)


async def send_preview(sink: PreviewSink, preview: PreviewImage) -> None:
    """Hand one preview to the sink; a failing sink is logged, never raised."""
    try:
        outcome = sink.send(preview)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:
        log.warning("a preview sink failed; the generation goes on", exc_info=True)


# Job ids an adapter has obtained during the current attempt. Dispatch sets a
# fresh list before each attempt, so that when the caller goes away mid-attempt
# it can cancel exactly the jobs this request submitted.
submitted_jobs: ContextVar[list[str] | None] = ContextVar("submitted_jobs", default=None)


# Who else wants to know a job id at once: the async job worker records it
# durably, so another replica can resume the job after a crash.
job_id_listener: ContextVar[Callable[[str, str], None] | None] = ContextVar("job_id_listener", default=None)


def note_job_id(job_id: str, backend: str | None = None) -> None:
    """Adapters call this as soon as a provider has given the work an id."""
    jobs = submitted_jobs.get()
    if jobs is not None:
        jobs.append(job_id)
    listener = job_id_listener.get()
    if listener is not None and backend is not None:
        listener(backend, job_id)


# Who wants to hear how a provider job is doing while it waits: a streaming
# request sends it to its caller as an SSE comment (gateway/http/streaming.py).
# Adapters report what the provider's own status says; nothing here is billed
# or routed on.
progress_listener: ContextVar[Callable[[str, Mapping[str, Any]], None] | None] = ContextVar("progress_listener", default=None)


def note_progress(backend: str, status: Any, **fields: Any) -> None:
    """Adapters call this on each status they poll: `status` is the provider's
    word for it (IN_QUEUE, processing...), `fields` what else it said
    (queue_position). Values that are not short text or numbers are dropped."""
    listener = progress_listener.get()
    if listener is None or not isinstance(status, str):
        return
    shown: dict[str, Any] = {"status": status[:40]}
    for name, value in fields.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) or (isinstance(value, str) and len(value) <= 40):
            shown[name] = value
    listener(backend, shown)


def deadline_error(job_id: str | None) -> ProviderError:
    if job_id:
        return ProviderError(FailureClass.UNKNOWN_OUTCOME, "deadline passed while the job was running", job_id=job_id, billed=True)
    return ProviderError(FailureClass.UNREACHABLE, "deadline passed before the request was sent")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def json_body(response: WireResponse, *, job_id: str | None = None) -> Any:
    """The JSON body, or a FAILED (garbage body) error."""
    try:
        return response_json(response)
    except ValueError:
        raise ProviderError(
            FailureClass.UNKNOWN_OUTCOME if job_id else FailureClass.FAILED,
            f"HTTP {response.status_code}: response body is not JSON",
            status=response.status_code,
            job_id=job_id,
            billed=bool(job_id),
        ) from None


async def sleep_until_next_poll(attempt: int, timeouts: Timeouts, deadline: float, job_id: str) -> None:
    """Back off between polls, never past the deadline."""
    delay = min(timeouts.poll_interval * (1.5**attempt), timeouts.max_poll_interval)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise deadline_error(job_id)
    await asyncio.sleep(min(delay, remaining))
