"""fal.ai: FLUX.2 [klein] 4B through fal's queue (docs/providers/fal.md).

One attempt is: POST the model input to `{base}/{endpoint}` with
`Authorization: Key <FAL_KEY>`; poll `status_url` (IN_QUEUE, IN_PROGRESS,
COMPLETED); GET `response_url` for the output. Status, result and cancel live
under `owner/alias` (`fal-ai/flux-2/requests/{id}`), never the endpoint's
sub-path (docs/providers/fal.md#endpoints).

Options (providers.yaml `options:`):
- `model`: text-to-image endpoint id; default `fal-ai/flux-2/klein/4b`.
- `edit_model`: edit endpoint id; default `fal-ai/flux-2/klein/4b/edit`.
- `sync_mode`: `auto` (default) asks for inline `data:` URIs when the caller
  wants `b64_json`, which saves a download (docs/providers/fal.md#request-body); `true` / `false` force it.
- `start_timeout_s`: sent as `X-Fal-Request-Timeout`, fal's time-to-start
  deadline: a job no runner has started by then is dropped with a 504 and never
  billed. `deadline` (default) sends the attempt's remaining time, so fal does
  not start work the gateway has stopped waiting for; a number caps it; `null`
  or `false` sends nothing.
- `probe_path`: the path under the base that `probe()` GETs. Default: the
  status of a request id that cannot exist, under owner/alias (see `probe`).
- `probe_timeout_s`: seconds a probe may take; default 10.
- `max_poll_errors`: consecutive transient failures (429, 5xx, dropped
  connections) tolerated while following a job; default 5.

Choices where fal's documents are silent or disagree:
- URLs from fal are followed only when their scheme, host and port match the
  configured base (and lie under its path). Anything else (an attacker's or a
  misconfigured host) is replaced by the URL rebuilt from base + owner/alias,
  so the key never travels to a foreign host.
- A COMPLETED status carrying `error` / `error_type` is a failure, classified
  by `error_type`: fal's infrastructure codes (docs/providers/fal.md#errors-and-their-classes) are FAILED and not
  billed ("5xx responses are never charged"); `content_policy_violation` is
  CONTENT_FILTERED; `bad_request` is REJECTED and not billed; a validation
  code (fal's model errors are pydantic-style: `less_than_equal`, `too_long`,
  `*_type`, `image_too_large`, ...; docs/providers/fal.md#errors-and-their-classes) is the input's fault, REJECTED
  and billed ("a 422 may still be charged if GPU time was used", fal FAQ); any
  other code, or none, is the runner's failure: FAILED and billed, so another
  backend is tried rather than the caller told their input was wrong.
- The result fetch is retried only for what fal's own client retries (408,
  409, 429, and nginx-generated 502/503/504 without `x-fal-request-id`); any
  other 4xx is the job's failure (billed), any other 5xx too (not billed).
- A 504 carrying `X-Fal-Request-Timeout-Type` means fal's start deadline
  fired: FAILED with code `request_timeout`, not billed, not worth retrying here.
- `guidance_scale` is not sent: the distilled endpoint has none (docs/providers/fal.md#request-body).
- Capabilities: sides 64..2048 in multiples of 16 (the model's limits; fal's
  4B bounds are not published), 1..4 images, 1..50 steps (docs/providers/fal.md#choices-made: the
  9B sibling documents 4..8; narrow with providers.yaml `capabilities:
  {min_steps: 4, max_steps: 8}` if fal enforces that), up to 4 references as
  URLs or data: URIs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import ImageJob, JobKind
from gateway.net.wire import WireResponse
from gateway.providers import register
from gateway.providers._images import output_image, reference_uri
from gateway.providers._json import response_json
from gateway.providers._wire import CREDENTIAL_STATUSES, StatusOverrides, as_outcome_unknown, follow_job, get_patiently, http_error, maybe_json, provider_text, trusted_url
from gateway.providers.base import (
    Adapter,
    AdapterSettings,
    EmulatorHook,
    FailureClass,
    GeneratedImage,
    ProbeResult,
    ProviderError,
    ProviderResult,
    json_body,
    note_job_id,
    note_progress,
)
from gateway.providers.options import AdapterOptions, VerifySize

DEFAULT_MODEL = "fal-ai/flux-2/klein/4b"
DEFAULT_EDIT_MODEL = "fal-ai/flux-2/klein/4b/edit"
PROBE_REQUEST_ID = "00000000-0000-0000-0000-000000000000"

# fal's request-error codes (docs/providers/fal.md#errors-and-their-classes, FAL-REQERR): infrastructure, never billed.
INFRA_ERROR_TYPES = frozenset(
    {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "runner_connection_error",
        "runner_incomplete_response",
        "runner_server_error",
        "internal_error",
        "internal_server_error",
        "generation_timeout",
        "downstream_service_error",
        "downstream_service_unavailable",
    }
)
CANCELLED_ERROR_TYPES = frozenset({"client_cancelled", "client_disconnected"})
CONTENT_ERROR_TYPES = frozenset({"content_policy_violation"})

# Where fal's statuses mean more than the shared table says. At submit, a 404
# is the endpoint id, not the input: FAILED, so it counts against health.
SUBMIT_STATUS_OVERRIDES: StatusOverrides = {404: FailureClass.FAILED}
# Once the job exists, a 5xx is its known end, not a refusal (503) or an
# unknown outcome (504): fal FAQ, "5xx responses are never charged".
FOLLOW_STATUS_OVERRIDES: StatusOverrides = {503: FailureClass.FAILED, 504: FailureClass.FAILED}

# Validation codes fal reports for bad model input (pydantic's codes and fal's
# own image checks, docs/providers/fal.md#errors-and-their-classes).
VALIDATION_ERROR_TYPES = frozenset(
    {
        "missing",
        "value_error",
        "type_error",
        "literal_error",
        "enum",
        "json_invalid",
        "extra_forbidden",
        "image_load_error",
        "file_download_error",
        "unsupported_image_format",
        "image_too_large",
        "image_too_small",
    }
)
_VALIDATION_PREFIXES = ("less_than", "greater_than", "too_", "string_", "int_", "float_", "bool_", "list_", "dict_", "url_")
_VALIDATION_SUFFIXES = ("_type", "_parsing", "_too_large", "_too_small", "_out_of_range", "_invalid")


def is_validation_error(error_type: str) -> bool:
    """Is this fal error code about the caller's input (not the runner)?"""
    return error_type in VALIDATION_ERROR_TYPES or error_type.startswith(_VALIDATION_PREFIXES) or error_type.endswith(_VALIDATION_SUFFIXES)


_QUEUE_STATUSES_PENDING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
_NAMESPACES = frozenset({"workflows", "comfy"})
_REMEMBERED_JOBS = 1024


def ended_in_error(status: Mapping[str, Any]) -> bool:
    """A COMPLETED status that is a failure: fal reports it in `error` / `error_type` (docs/providers/fal.md#status-flow)."""
    return bool(status.get("error") or status.get("error_type"))


def queue_app(endpoint_id: str) -> str:
    """The `owner/alias` that status, result and cancel URLs use (docs/providers/fal.md#endpoints).

    `fal-ai/flux-2/klein/4b/edit` -> `fal-ai/flux-2`; the `workflows` and `comfy`
    namespaces stay as a prefix."""
    parts = [p for p in endpoint_id.strip("/").split("/") if p]
    namespace = [parts.pop(0)] if parts and parts[0] in _NAMESPACES else []
    if len(parts) < 2:
        raise ValueError(f"fal endpoint id {endpoint_id!r} has no owner/alias")
    return "/".join(namespace + parts[:2])


@dataclass(frozen=True, slots=True)
class QueueUrls:
    status: str
    response: str
    cancel: str


def error_detail(body: Any, response: WireResponse) -> tuple[str, str | None, list[str]]:
    """(message, error code, model error types) of a fal error response.

    Model errors: `{"detail": [{loc, msg, type}]}`; request errors: `{"detail": "...",
    "error_type": "..."}` with `X-Fal-Error-Type` (docs/providers/fal.md#errors-and-their-classes)."""
    types: list[str] = []
    message = ""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if not isinstance(item, dict):
                continue
            loc = [str(x) for x in item.get("loc") or [] if x != "body"]
            msg = str(item.get("msg") or item.get("type") or "invalid input")
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
            if isinstance(item.get("type"), str):
                types.append(item["type"])
        message = "; ".join(parts)
    elif isinstance(detail, str):
        message = detail
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    if not message:
        message = response.text or response.reason_phrase or "error"
    code = body.get("error_type") if isinstance(body, dict) and isinstance(body.get("error_type"), str) else None
    code = code or response.headers.get("x-fal-error-type") or (types[0] if types else None)
    return message, code, types


@dataclass(frozen=True, slots=True)
class FalOptions(AdapterOptions):
    """The adapter's options, validated; see the module docstring for each."""

    model: str = DEFAULT_MODEL
    edit_model: str = DEFAULT_EDIT_MODEL
    verify_size: VerifySize = "reported"  # the result's `images[]` documents width and height
    sync_mode: Literal["auto"] | bool = "auto"
    start_timeout_s: Literal["deadline", False] | float | None = "deadline"
    probe_path: str | None = None
    probe_timeout_s: float = 10.0
    max_poll_errors: int = 5

    def validate(self, prefix: str) -> None:
        for name in ("model", "edit_model"):
            try:
                queue_app(getattr(self, name))  # fail at start-up, not on the first request
            except ValueError as exc:
                raise ValueError(f"{prefix}option {name}: {exc}") from None
        if not isinstance(self.start_timeout_s, str) and self.start_timeout_s is not None and self.start_timeout_s is not False and self.start_timeout_s <= 0:
            raise ValueError(f"{prefix}option start_timeout_s must be positive, deadline, false or null")
        if self.probe_timeout_s <= 0:
            raise ValueError(f"{prefix}option probe_timeout_s must be positive")
        if self.max_poll_errors < 0:
            raise ValueError(f"{prefix}option max_poll_errors must be 0 or more")


def _result_transient(response: WireResponse) -> bool:
    """What fal's own client retries (docs/providers/fal.md#result): 408/409/429 and ingress errors."""
    status = response.status_code
    if status in (408, 409, 429):
        return True
    return status in (502, 503, 504) and "x-fal-request-id" not in response.headers and "nginx" in response.text.lower()


@register
class FalAdapter(Adapter):
    kind: ClassVar[str] = "fal"
    credential_env: ClassVar[str | None] = "FAL_KEY"
    base_url_env: ClassVar[str] = "KLEIN_FAL_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://queue.fal.run"
    options_type = FalOptions
    emulator: ClassVar[EmulatorHook | None] = EmulatorHook("tests.emulators.fal:FalEmulator", key_prefix="emu-fal-")
    opts: FalOptions
    default_capabilities: ClassVar[Capabilities] = Capabilities(
        min_side=64,
        max_side=2048,
        multiple_of=16,
        max_n=4,
        min_steps=1,
        max_steps=50,
        max_references=4,
        accepts_data_uri_refs=True,
        output_formats=frozenset({"png", "jpeg", "webp"}),
    )

    # No fal option changes what it can do; providers.yaml `capabilities:` narrows it.

    def __init__(self, settings: AdapterSettings, client: httpx.AsyncClient) -> None:
        super().__init__(settings, client)
        self.model = self.opts.model.strip("/")
        self.edit_model = self.opts.edit_model.strip("/")
        self._max_poll_errors = self.opts.max_poll_errors
        self._cancel_urls: OrderedDict[str, str] = OrderedDict()

    # ---- generate ------------------------------------------------------------

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        headers = self._auth()
        endpoint = self.edit_model if job.kind is JobKind.EDIT else self.model
        submit_headers = {**headers, **self._start_timeout_header(deadline)}
        response = await self.request("POST", f"{self.base}/{endpoint}", deadline=deadline, headers=submit_headers, json=self.model_input(job))
        if response.status_code >= 400:
            raise self._error(response)
        body = json_body(response)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(request_id, str) or not request_id:
            raise ProviderError(FailureClass.FAILED, f"HTTP {response.status_code}: submit response has no request_id", status=response.status_code)
        note_job_id(request_id, self.name)
        urls = self._queue_urls(endpoint, request_id, body)
        self._remember(request_id, urls.cancel)
        return await self._follow(job, urls, request_id, headers, deadline)

    resumable: ClassVar[bool] = True

    async def resume(self, job: ImageJob, job_ids: Sequence[str], deadline: float) -> ProviderResult:
        """Follow a queue request submitted earlier, by its request id (one per job)."""
        if len(job_ids) != 1:
            raise ProviderError(FailureClass.FAILED, f"expected one fal request id to resume, got {len(job_ids)}")
        endpoint = self.edit_model if job.kind is JobKind.EDIT else self.model
        urls = self._own_urls(endpoint, job_ids[0])
        self._remember(job_ids[0], urls.cancel)
        return await self._follow(job, urls, job_ids[0], self._auth(), deadline)

    async def _follow(self, job: ImageJob, urls: QueueUrls, request_id: str, headers: Mapping[str, str], deadline: float) -> ProviderResult:
        status = await self._wait_until_completed(urls.status, request_id, headers, deadline)
        if ended_in_error(status):
            raise self._completed_error(status, request_id)
        output = await self._fetch_result(urls.response, request_id, headers, deadline)
        return self._result(job, output, request_id, status)

    def model_input(self, job: ImageJob) -> dict[str, Any]:
        """The model input (docs/providers/fal.md#request-body); the queue takes it unwrapped."""
        body: dict[str, Any] = {
            "prompt": job.prompt,
            "image_size": {"width": job.width, "height": job.height},
            "num_images": job.n,
            "num_inference_steps": job.steps,
            "output_format": job.output_format,
            "enable_safety_checker": job.enable_safety_checker,
        }
        if job.seed is not None:
            body["seed"] = job.seed
        if self._sync_mode(job):
            body["sync_mode"] = True
        if job.kind is JobKind.EDIT:
            body["image_urls"] = [reference_uri(ref) for ref in job.references]
        return body

    def _sync_mode(self, job: ImageJob) -> bool:
        choice = self.opts.sync_mode
        if choice == "auto":
            return job.response_format == "b64_json"
        return bool(choice)

    def _start_timeout_header(self, deadline: float) -> dict[str, str]:
        choice = self.opts.start_timeout_s
        if choice is None or choice is False:
            return {}
        remaining = deadline - time.monotonic()
        seconds = remaining if choice == "deadline" else min(float(choice), remaining)
        whole = int(seconds)  # fal takes whole seconds, more than one; a shorter budget sends none
        if whole <= 1:
            return {}
        return {"X-Fal-Request-Timeout": str(whole)}

    def _auth(self) -> dict[str, str]:
        if not self.settings.credential:
            raise ProviderError(FailureClass.REFUSED, "no fal API key configured", credentials_invalid=True)
        return {"Authorization": f"Key {self.settings.credential}"}

    def _own_urls(self, endpoint: str, request_id: str) -> QueueUrls:
        own = f"{self.base}/{queue_app(endpoint)}/requests/{quote(request_id, safe='')}"
        return QueueUrls(status=f"{own}/status", response=own, cancel=f"{own}/cancel")

    def _queue_urls(self, endpoint: str, request_id: str, body: Mapping[str, Any]) -> QueueUrls:
        """The URLs fal returned, where they stay under our base; rebuilt ones otherwise."""
        own = self._own_urls(endpoint, request_id)
        return QueueUrls(
            status=trusted_url(body.get("status_url"), self.base, own.status, what="status_url"),
            response=trusted_url(body.get("response_url"), self.base, own.response, what="response_url"),
            cancel=trusted_url(body.get("cancel_url"), self.base, own.cancel, what="cancel_url"),
        )

    def _remember(self, request_id: str, cancel_url: str) -> None:
        self._cancel_urls[request_id] = cancel_url
        while len(self._cancel_urls) > _REMEMBERED_JOBS:
            self._cancel_urls.popitem(last=False)

    async def _wait_until_completed(self, url: str, request_id: str, headers: Mapping[str, str], deadline: float) -> Mapping[str, Any]:
        async def poll() -> Mapping[str, Any] | None:
            response = await get_patiently(self, url, deadline=deadline, job_id=request_id, headers=headers, max_errors=self._max_poll_errors)
            if response.status_code >= 400:
                raise as_outcome_unknown(self._error(response, job_id=request_id), request_id)
            body = json_body(response, job_id=request_id)
            status = body.get("status") if isinstance(body, dict) else None
            if status == "COMPLETED" and isinstance(body, dict):
                return body
            if isinstance(body, dict):
                note_progress(self.name, status, queue_position=body.get("queue_position"))
            if status not in _QUEUE_STATUSES_PENDING:
                raise ProviderError(FailureClass.FAILED, f"unknown queue status {provider_text(status, self.settings.credential, 40)!r}", status=response.status_code, job_id=request_id, billed=True)
            return None

        return await follow_job(poll, timeouts=self.settings.timeouts, deadline=deadline, job_id=request_id, wait_first=False)

    async def _fetch_result(self, url: str, request_id: str, headers: Mapping[str, str], deadline: float) -> Any:
        response = await get_patiently(self, url, deadline=deadline, job_id=request_id, headers=headers, max_errors=self._max_poll_errors, transient=_result_transient)
        if response.status_code >= 400:
            raise self._error(response, job_id=request_id)
        try:
            return response_json(response)
        except ValueError:
            raise ProviderError(FailureClass.FAILED, f"HTTP {response.status_code}: result body is not JSON", status=response.status_code, job_id=request_id, billed=True) from None

    # ---- errors --------------------------------------------------------------

    def _error(self, response: WireResponse, *, job_id: str | None = None) -> ProviderError:
        """A fal error response as a ProviderError. Without `job_id` it is the submit's."""
        message, code, types = error_detail(maybe_json(response), response)
        message = provider_text(message, self.settings.credential)
        code = code and provider_text(code, self.settings.credential, 64)
        status = response.status_code
        if CONTENT_ERROR_TYPES.intersection(types) or code in CONTENT_ERROR_TYPES:
            return ProviderError(FailureClass.CONTENT_FILTERED, f"HTTP {status}: {message}", status=status, job_id=job_id, billed=job_id is not None, code=code)
        submitted = job_id is not None
        if not submitted and status == 404:
            message = f"model endpoint not found: {message}"
        overrides = FOLLOW_STATUS_OVERRIDES if submitted else SUBMIT_STATUS_OVERRIDES
        # fal FAQ: 5xx responses are never charged; a 4xx after the job ran may be.
        error = http_error(response, message, job_id=job_id, code=code, billed=submitted and status < 500, overrides=overrides)
        if status == 504 and "x-fal-request-timeout-type" in response.headers:
            return replace(error, failure=FailureClass.FAILED, code=code or "request_timeout", billed=False)
        return error

    def _completed_error(self, status: Mapping[str, Any], request_id: str) -> ProviderError:
        """COMPLETED with `error` / `error_type` (docs/providers/fal.md#status-flow)."""
        error_type = status.get("error_type") if isinstance(status.get("error_type"), str) else None
        message = provider_text(status.get("error") or error_type or "job failed", self.settings.credential)
        if error_type in CONTENT_ERROR_TYPES:
            failure, billed = FailureClass.CONTENT_FILTERED, True
        elif error_type in INFRA_ERROR_TYPES:
            failure, billed = FailureClass.FAILED, False
        elif error_type in CANCELLED_ERROR_TYPES:
            failure, billed = FailureClass.FAILED, True
        elif error_type == "bad_request":
            failure, billed = FailureClass.REJECTED, False
        elif error_type and is_validation_error(error_type):
            failure, billed = FailureClass.REJECTED, True
        else:
            failure, billed = FailureClass.FAILED, True
        return ProviderError(failure, f"job failed: {message}", job_id=request_id, billed=billed, code=error_type and provider_text(error_type, self.settings.credential, 64))

    # ---- result --------------------------------------------------------------

    def _result(self, job: ImageJob, output: Any, request_id: str, status: Mapping[str, Any]) -> ProviderResult:
        """`v4Output` (docs/providers/fal.md#result) as a ProviderResult."""

        def broken(why: str) -> ProviderError:
            return ProviderError(FailureClass.FAILED, f"result {why}", job_id=request_id, billed=True)

        items = output.get("images") if isinstance(output, dict) else None
        if not isinstance(items, list) or not items:
            raise broken("has no images")
        flags = output.get("has_nsfw_concepts")
        flags = [bool(f) for f in flags] if isinstance(flags, list) and len(flags) == len(items) else None
        seed = output.get("seed") if isinstance(output.get("seed"), int) else None
        images: list[GeneratedImage] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise broken("has an image without a url")
            try:
                images.append(
                    output_image(
                        item["url"],
                        content_type=item.get("content_type") if isinstance(item.get("content_type"), str) else job.media_type,
                        width=item.get("width") if isinstance(item.get("width"), int) else None,
                        height=item.get("height") if isinstance(item.get("height"), int) else None,
                        nsfw=flags[i] if flags else None,
                    )
                )
            except ValueError:
                raise broken("has a malformed data: URI") from None
        if flags and all(flags):
            raise ProviderError(FailureClass.CONTENT_FILTERED, "every image was flagged by the safety checker", job_id=request_id, billed=True, code="nsfw")
        raw = {"request_id": request_id, "timings": output.get("timings"), "metrics": status.get("metrics")}
        return ProviderResult(images=self.sizes_to_verify(images, job), seed=seed, job_id=request_id, raw=raw)

    # ---- cancel and probe ----------------------------------------------------

    async def cancel(self, job_id: str) -> bool | None:
        """PUT the job's cancel URL; errors are ignored, as fal's own client does (docs/providers/fal.md#cancel).

        True: it never bills (removed from the queue, or it had already ended
        in a way fal does not charge for). None: a running job was only
        signalled (`CANCELLATION_REQUESTED`), so it may still finish and bill.
        False: refused, unanswered, or it had already ended billed."""
        url = self._cancel_urls.get(job_id) or self._own_urls(self.model, job_id).cancel
        try:
            headers = self._auth()
            response = await self.request("PUT", url, deadline=time.monotonic() + self.settings.timeouts.request, job_id=job_id, headers=headers)
        except ProviderError:
            return False
        answer = maybe_json(response)
        said = answer.get("status") if isinstance(answer, dict) else None
        if said == "ALREADY_COMPLETED":
            # It ended before the cancel came, e.g. dropped by its X-Fal-Request-Timeout
            # as the attempt's time ran out: how it ended says whether it bills.
            self._cancel_urls.pop(job_id, None)
            return await self._ended_unbilled(job_id, headers)
        if not 200 <= response.status_code < 300 or said == "NOT_FOUND":
            return False
        self._cancel_urls.pop(job_id, None)
        if said == "CANCELLATION_REQUESTED":
            return None
        return True

    async def _ended_unbilled(self, job_id: str, headers: Mapping[str, str]) -> bool:
        """One status read of an ended job: True when its end is one fal does not
        bill (a start deadline, an infrastructure error), False otherwise or unread."""
        url = self._own_urls(self.model, job_id).status
        try:
            response = await self.request("GET", url, deadline=time.monotonic() + self.settings.timeouts.request, job_id=job_id, headers=headers)
        except ProviderError:
            return False
        status = maybe_json(response) if response.status_code == 200 else None
        if not isinstance(status, dict) or status.get("status") != "COMPLETED" or not ended_in_error(status):
            return False
        return not self._completed_error(status, job_id).billed

    async def probe(self) -> ProbeResult:
        """A free check of reachability and the key: never a submit.

        fal publishes no free health endpoint for a model. The probe GETs the
        status of a request id that cannot exist, under owner/alias: with a
        valid key fal answers 404 (or another 4xx), which proves the queue is
        reachable and the key accepted; 401/403 proves the key bad. This rests on
        fal checking the key before looking the request up (the queue
        authenticates every call). `probe_path` points it elsewhere."""
        path = self.opts.probe_path or f"{queue_app(self.model)}/requests/{PROBE_REQUEST_ID}/status"
        url = f"{self.base}/{str(path).lstrip('/')}"
        if not self.settings.credential:
            return ProbeResult(False, "no API key configured")
        started = time.monotonic()
        try:
            headers = self._auth()
            response = await self.request("GET", url, deadline=started + self.opts.probe_timeout_s, headers=headers)
        except ProviderError as exc:
            return ProbeResult(False, f"unreachable: {exc.message}", time.monotonic() - started)
        latency = time.monotonic() - started
        status = response.status_code
        if status in CREDENTIAL_STATUSES:
            return ProbeResult(False, f"credentials rejected (HTTP {status})", latency, credentials_invalid=True)
        if status == 429 or status >= 500:
            return ProbeResult(False, f"HTTP {status}", latency)
        return ProbeResult(True, f"reachable, key accepted (HTTP {status})", latency)
