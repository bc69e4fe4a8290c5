"""Replicate: FLUX.2 [klein] 4B as an official model (docs/providers/replicate.md).

One attempt is: `POST {base}/v1/models/{model}/predictions` with
`Authorization: Bearer <REPLICATE_API_TOKEN>` and `Prefer: wait=N`, which holds
the call open until the prediction finishes or N seconds pass (docs/providers/replicate.md#request-body);
a prediction still `starting` / `processing` is then polled at `urls.get`
until it is terminal.

Replicate's klein takes no width or height, only `aspect_ratio` and
`output_megapixels` (docs/providers/replicate.md#sizes), so the adapter keeps a table from exact
(width, height) to that pair and is eligible only for the sizes in it. The
default table is the 1 MP sizes Lumenfall publishes for this model.

Options (providers.yaml `options:`):
- `model`: `owner/name`; default `black-forest-labs/flux-2-klein-4b`.
- `sizes`: the size table, replacing the default: `{"WxH": {aspect_ratio:
  "16:9", output_megapixels: "1"}}` (a two-item list `[ratio, megapixels]`
  works too). `capabilities_for(options)` derives `exact_sizes` from it, so
  eligibility and the wire never disagree.
- `prefer_wait_s`: N in `Prefer: wait=N`; default 60, capped by the time left
  before the deadline less `prefer_wait_margin_s` (Replicate takes 1..60).
  `0` or `false` sends no header and polls from the start.
- `prefer_wait_margin_s`: how long before the attempt's deadline the held
  create call must end; default 1.0. The create's answer carries the
  prediction's id, and an id the gateway never learned names a prediction it
  can neither cancel nor follow; so the hold is N = floor(remaining - margin),
  and where that is under 1 s no `Prefer` header is sent at all (an async
  create answers at once with the id; the prediction is then polled).
- `cancel_after`: the `Cancel-After` header. `deadline` (default) sends the
  attempt's remaining time as whole seconds (`"45s"`, the Go-duration form of
  Replicate's `1m` example; the grammar is unconfirmed, docs/providers/replicate.md#choices-made); a
  string is sent as given; `null` / `false` sends none.
- `go_fast`: sent as `go_fast` when set; omitted by default (Replicate's default).
- `probe_timeout_s`: seconds a probe may take; default 10.
- `max_poll_errors`: consecutive transient poll failures tolerated; default 5.

Choices where Replicate's documents are silent:
- n > 1: the captured klein schema has no image-count input, so n images are
  n predictions created together (with seeds `seed + i` when a seed is given,
  else each random); the job id is their ids joined by commas, and `cancel`
  takes that form. If one fails, the rest are cancelled and the error says so;
  narrow with `capabilities: {max_n: 1}` to turn this off.
- Billing of `failed`: billed if the prediction started running (`started_at`
  set), and billed when `started_at` is absent from the object (unknown, so
  assume the worst); not billed when it is present and null. `canceled` is
  billed, `aborted` is not (docs/providers/replicate.md#status-flow, REP-DL).
- A `failed` prediction whose error mentions NSFW or the safety checker is
  CONTENT_FILTERED: Replicate reports no per-image flags.
- Steps: the model exposes no step count, so it always runs its default 4
  (`fixed_steps: 4`); a job asking for other steps is not eligible.
- `output_format`: Replicate says `jpg`, the gateway `jpeg`.
- Reference images go as the caller's URL or as a data: URI (Replicate accepts
  both for file inputs; it recommends data URIs only below about 1 MB).
- `metrics.predict_time` is reported in `raw` (summed over predictions); no
  cost figure: Replicate's API returns none.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import ImageJob, JobKind
from gateway.net.wire import WireResponse
from gateway.providers import register
from gateway.providers._images import content_type_from_url, output_image, reference_uri
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
from gateway.providers.options import AdapterOptions

DEFAULT_MODEL = "black-forest-labs/flux-2-klein-4b"
MAX_PREFER_WAIT_S = 60
KLEIN_DEFAULT_STEPS = 4


@dataclass(frozen=True, slots=True)
class SizeSpec:
    """What Replicate's klein is asked for to produce one exact size."""

    aspect_ratio: str
    output_megapixels: str


# Lumenfall's published 1 MP sizes for this model on Replicate (docs/providers/replicate.md#sizes, LF-LLMS).
DEFAULT_SIZES: Mapping[tuple[int, int], SizeSpec] = {
    (1024, 1024): SizeSpec("1:1", "1"),
    (1365, 768): SizeSpec("16:9", "1"),
    (768, 1365): SizeSpec("9:16", "1"),
    (1254, 836): SizeSpec("3:2", "1"),
    (836, 1254): SizeSpec("2:3", "1"),
    (1183, 887): SizeSpec("4:3", "1"),
    (887, 1182): SizeSpec("3:4", "1"),
    (1145, 916): SizeSpec("5:4", "1"),
    (916, 1145): SizeSpec("4:5", "1"),
    (1563, 670): SizeSpec("21:9", "1"),
    (670, 1564): SizeSpec("9:21", "1"),
}

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
PENDING = frozenset({"starting", "processing"})
_CONTENT_FILTER_WORDS = re.compile(r"nsfw|safety checker|safety filter|content policy", re.IGNORECASE)
# At create, a 404 is the model path, not the input: FAILED, so it counts
# against health (the shared table says REJECTED).
CREATE_STATUS_OVERRIDES: StatusOverrides = {404: FailureClass.FAILED}
_THROTTLE_RESET = re.compile(r"resets in ~?(\d+(?:\.\d+)?)\s*s", re.IGNORECASE)


def _megapixels_text(value: Any) -> str:
    """Replicate's `output_megapixels` is a string enum: 1 -> "1", 0.25 -> "0.25"."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"output_megapixels must be a number or string, not {value!r}")
    if isinstance(value, str):
        return value.strip()
    return f"{value:g}"


def size_table(options: Mapping[str, Any]) -> dict[tuple[int, int], SizeSpec]:
    """The (width, height) -> SizeSpec table from options `sizes`, or the default.

    Raises ValueError naming the bad entry, for `check-config`."""
    return sizes_from(options.get("sizes"))


def sizes_from(raw: Any) -> dict[tuple[int, int], SizeSpec]:
    """The size table from the `sizes` option's value (None: the default)."""
    if raw is None:
        return dict(DEFAULT_SIZES)
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError("options.sizes must be a non-empty mapping of 'WxH' to {aspect_ratio, output_megapixels}")
    table: dict[tuple[int, int], SizeSpec] = {}
    for key, spec in raw.items():
        try:
            w, sep, h = str(key).lower().partition("x")
            size = (int(w), int(h))
            if not sep or size[0] <= 0 or size[1] <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"options.sizes: {key!r} is not a size like '1024x1024'") from None
        if isinstance(spec, Mapping):
            ratio, megapixels = spec.get("aspect_ratio"), spec.get("output_megapixels", "1")
        elif isinstance(spec, (list, tuple)) and len(spec) == 2:
            ratio, megapixels = spec
        else:
            raise ValueError(f"options.sizes.{key}: expected {{aspect_ratio, output_megapixels}}")
        if not isinstance(ratio, str) or not ratio:
            raise ValueError(f"options.sizes.{key}: aspect_ratio must be a string such as '16:9'")
        try:
            table[size] = SizeSpec(ratio, _megapixels_text(megapixels))
        except ValueError as exc:
            raise ValueError(f"options.sizes.{key}: {exc}") from None
    return table


def problem_message(body: Any, response: WireResponse) -> str:
    """The human part of an RFC 7807 problem details body (docs/providers/replicate.md#errors-and-their-classes)."""
    if isinstance(body, dict):
        message = str(body.get("detail") or body.get("title") or "")
        fields = body.get("invalid_fields")
        if isinstance(fields, list):
            described = [f"{f.get('field')}: {f.get('description') or f.get('type')}" for f in fields if isinstance(f, dict) and f.get("field")]
            message = "; ".join(filter(None, [message, *described]))
        if message:
            return message
    return response.text or response.reason_phrase or "error"


@dataclass(frozen=True, slots=True)
class ReplicateOptions(AdapterOptions):
    """The adapter's options, validated; see the module docstring for each."""

    model: str = DEFAULT_MODEL
    sizes: Mapping[str, Any] | None = None
    prefer_wait_s: float | Literal[False] | None = MAX_PREFER_WAIT_S
    prefer_wait_margin_s: float = 1.0
    cancel_after: Literal["deadline", False] | str | None = "deadline"
    go_fast: bool | None = None
    probe_timeout_s: float = 10.0
    max_poll_errors: int = 5

    def validate(self, prefix: str) -> None:
        if len([p for p in self.model.strip("/").split("/") if p]) != 2:
            raise ValueError(f"{prefix}option model must be owner/name, not {self.model!r}")
        sizes_from(self.sizes)  # names the bad entry
        if not isinstance(self.prefer_wait_s, bool) and self.prefer_wait_s is not None and self.prefer_wait_s < 0:
            raise ValueError(f"{prefix}option prefer_wait_s must be 0 to {MAX_PREFER_WAIT_S}, false or null")
        if self.prefer_wait_margin_s < 0:
            raise ValueError(f"{prefix}option prefer_wait_margin_s must be 0 or more")
        if self.probe_timeout_s <= 0:
            raise ValueError(f"{prefix}option probe_timeout_s must be positive")
        if self.max_poll_errors < 0:
            raise ValueError(f"{prefix}option max_poll_errors must be 0 or more")


@register
class ReplicateAdapter(Adapter):
    kind: ClassVar[str] = "replicate"
    credential_env: ClassVar[str | None] = "REPLICATE_API_TOKEN"
    base_url_env: ClassVar[str] = "KLEIN_REPLICATE_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://api.replicate.com"
    options_type = ReplicateOptions
    emulator: ClassVar[EmulatorHook | None] = EmulatorHook("tests.emulators.replicate:ReplicateEmulator", key_prefix="r8_emu")
    opts: ReplicateOptions
    default_capabilities: ClassVar[Capabilities] = Capabilities(
        exact_sizes=frozenset(DEFAULT_SIZES),
        max_n=4,
        fixed_steps=KLEIN_DEFAULT_STEPS,
        max_references=4,  # Replicate takes 5; the model's limit is 4
        accepts_data_uri_refs=True,
        output_formats=frozenset({"png", "jpeg", "webp"}),
    )

    @classmethod
    def capabilities_for(cls, options: Mapping[str, Any] | None = None, kind: JobKind | None = None) -> Capabilities:
        """Capabilities consistent with options `sizes`: exactly the sizes the table can produce."""
        opts = ReplicateOptions.parse(options, cls.kind)
        return replace(cls.default_capabilities, exact_sizes=frozenset(sizes_from(opts.sizes)))

    def __init__(self, settings: AdapterSettings, client: httpx.AsyncClient) -> None:
        super().__init__(settings, client)
        self.model = self.opts.model.strip("/")
        self.sizes = sizes_from(self.opts.sizes)
        self._max_poll_errors = self.opts.max_poll_errors

    # ---- generate ------------------------------------------------------------

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        headers = self._auth()
        spec = self.sizes.get((job.width, job.height))
        if spec is None:
            raise ProviderError(FailureClass.REJECTED, f"cannot produce exactly {job.width}x{job.height}", code="size")
        inputs = [self.model_input(job, spec, index) for index in range(job.n)]
        predictions = await self._run_all(inputs, headers, deadline)
        return self._result(job, predictions)

    def model_input(self, job: ImageJob, spec: SizeSpec, index: int = 0) -> dict[str, Any]:
        """The klein input (docs/providers/replicate.md#request-body) for the `index`-th image of the job."""
        body: dict[str, Any] = {
            "prompt": job.prompt,
            "aspect_ratio": spec.aspect_ratio,
            "output_megapixels": spec.output_megapixels,
            "output_format": "jpg" if job.output_format == "jpeg" else job.output_format,
            "disable_safety_checker": not job.enable_safety_checker,
        }
        if job.seed is not None:
            body["seed"] = job.seed + index
        if job.references:
            body["images"] = [reference_uri(ref) for ref in job.references]
        if job.output_compression is not None and job.output_format != "png":
            body["output_quality"] = job.output_compression
        go_fast = self.opts.go_fast
        if go_fast is not None:
            body["go_fast"] = bool(go_fast)
        return body

    def _auth(self) -> dict[str, str]:
        if not self.settings.credential:
            raise ProviderError(FailureClass.REFUSED, "no Replicate API token configured", credentials_invalid=True)
        return {"Authorization": f"Bearer {self.settings.credential}"}

    async def _run_all(self, inputs: list[dict[str, Any]], headers: Mapping[str, str], deadline: float) -> list[Mapping[str, Any]]:
        """One prediction per image, created together; on a failure the others are cancelled."""
        created: dict[int, str] = {}
        if len(inputs) == 1:
            return [await self._run(inputs[0], headers, deadline, created, 0)]
        tasks = [asyncio.create_task(self._run(body, headers, deadline, created, i)) for i, body in enumerate(inputs)]
        try:
            return list(await asyncio.gather(*tasks))
        except ProviderError as exc:
            raise await self._abandon(tasks, created, exc) from None
        finally:
            for task in tasks:
                task.cancel()

    async def _abandon(self, tasks: list[asyncio.Task[Mapping[str, Any]]], created: dict[int, str], error: ProviderError) -> ProviderError:
        """Stop the sibling predictions of a failed one; the error says what may be billed."""
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        billed = error.billed
        leftovers = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ProviderError):
                billed = billed or outcome.billed
            elif isinstance(outcome, BaseException):  # cancelled by us: it may have been created and started
                billed = True
                if index in created:
                    leftovers.append(created[index])
            else:
                billed = True  # it succeeded, and is paid for
        await asyncio.gather(*(self.cancel(pid) for pid in leftovers))
        note = f" (1 of {len(tasks)} predictions; the others were stopped)"
        return replace(error, message=error.message + note, billed=billed)

    async def _run(self, body: Mapping[str, Any], headers: Mapping[str, str], deadline: float, created: dict[int, str], index: int) -> Mapping[str, Any]:
        """Create one prediction and follow it to a successful end; raise for any other end."""
        remaining = deadline - time.monotonic()
        create_headers = dict(headers)
        wait = self._prefer_wait(remaining)
        if wait:
            create_headers["Prefer"] = f"wait={wait}"
        cancel_after = self._cancel_after(remaining)
        if cancel_after:
            create_headers["Cancel-After"] = cancel_after
        url = f"{self.base}/v1/models/{self.model}/predictions"
        response = await self.request("POST", url, deadline=deadline, timeout=wait + 5 if wait else None, headers=create_headers, json={"input": dict(body)})
        if response.status_code >= 400:
            raise self._error(response)
        prediction = maybe_json(response)
        pid = prediction.get("id") if isinstance(prediction, dict) else None
        if not isinstance(pid, str) or not pid:
            raise ProviderError(FailureClass.FAILED, f"HTTP {response.status_code}: create response is not a prediction", status=response.status_code)
        created[index] = pid
        note_job_id(pid, self.name)
        if prediction.get("status") not in TERMINAL:
            prediction = await self._follow(prediction, pid, headers, deadline)
        return self._settle(prediction, pid)

    resumable: ClassVar[bool] = True

    async def resume(self, job: ImageJob, job_ids: Sequence[str], deadline: float) -> ProviderResult:
        """Follow predictions created earlier (one per image) to their results."""
        if len(job_ids) != job.n:
            raise ProviderError(FailureClass.FAILED, f"{len(job_ids)} of {job.n} predictions were recorded; cannot resume")
        headers = self._auth()

        async def one(pid: str) -> Mapping[str, Any]:
            return self._settle(await self._follow({"status": "starting"}, pid, headers, deadline), pid)

        return self._result(job, list(await asyncio.gather(*(one(pid) for pid in job_ids))))

    def _prefer_wait(self, remaining: float) -> int:
        """N for `Prefer: wait=N`, ending `prefer_wait_margin_s` before the deadline; 0: send none (async create)."""
        choice = self.opts.prefer_wait_s
        if choice is None or choice is False or choice == 0:
            return 0
        wait = min(int(choice), MAX_PREFER_WAIT_S, math.floor(remaining - self.opts.prefer_wait_margin_s))
        return wait if wait >= 1 else 0

    def _cancel_after(self, remaining: float) -> str | None:
        choice = self.opts.cancel_after
        if choice is None or choice is False:
            return None
        if choice == "deadline":
            return f"{max(1, math.ceil(remaining))}s"
        return str(choice)

    async def _follow(self, prediction: Mapping[str, Any], pid: str, headers: Mapping[str, str], deadline: float) -> Mapping[str, Any]:
        """Poll `urls.get` (only under our base) until the prediction is terminal."""
        own = f"{self.base}/v1/predictions/{quote(pid, safe='')}"
        urls = prediction.get("urls")
        url = trusted_url(urls.get("get") if isinstance(urls, dict) else None, self.base, own, what="urls.get")

        def settled(prediction: Mapping[str, Any]) -> Mapping[str, Any] | None:
            status = prediction.get("status")
            if status in TERMINAL:
                return prediction
            if status not in PENDING:
                raise ProviderError(FailureClass.FAILED, f"unknown prediction status {provider_text(status, self.settings.credential, 40)!r}", job_id=pid, billed=True)
            return None

        async def poll() -> Mapping[str, Any] | None:
            response = await get_patiently(self, url, deadline=deadline, job_id=pid, headers=headers, max_errors=self._max_poll_errors)
            if response.status_code >= 400:
                raise as_outcome_unknown(self._error(response, job_id=pid), pid)
            body = json_body(response, job_id=pid)
            if not isinstance(body, dict):
                raise ProviderError(FailureClass.UNKNOWN_OUTCOME, f"HTTP {response.status_code}: poll body is not a prediction", job_id=pid, billed=True)
            note_progress(self.name, body.get("status"))
            return settled(body)

        done = settled(prediction)
        if done is not None:
            return done
        return await follow_job(poll, timeouts=self.settings.timeouts, deadline=deadline, job_id=pid, wait_first=True)

    def _settle(self, prediction: Mapping[str, Any], pid: str) -> Mapping[str, Any]:
        """A terminal prediction: returned if it succeeded, raised as a ProviderError otherwise."""
        status = prediction.get("status")
        if status == "succeeded":
            return prediction
        if status == "aborted":  # Cancel-After fired before it started: not billed (REP-DL)
            raise self._end(FailureClass.FAILED, "prediction aborted before it started", pid, billed=False, code="aborted")
        if status == "canceled":  # stopped while running: billed (REP-DL)
            raise self._end(FailureClass.FAILED, "prediction canceled", pid, billed=True, code="canceled")
        if status == "failed":
            error = str(prediction.get("error") or "no error given")
            started = prediction.get("started_at", "unknown") is not None
            failure = FailureClass.CONTENT_FILTERED if _CONTENT_FILTER_WORDS.search(error) else FailureClass.FAILED
            raise self._end(failure, f"prediction failed: {error}", pid, billed=started, code="failed")
        raise ProviderError(FailureClass.FAILED, f"unknown prediction status {provider_text(status, self.settings.credential, 40)!r}", job_id=pid, billed=True)

    def _end(self, failure: FailureClass, message: str, pid: str, *, billed: bool, code: str) -> ProviderError:
        return ProviderError(failure, provider_text(message, self.settings.credential), job_id=pid, billed=billed, code=code)

    # ---- errors and result ---------------------------------------------------

    def _error(self, response: WireResponse, *, job_id: str | None = None) -> ProviderError:
        """A problem-details response (docs/providers/replicate.md#errors-and-their-classes) as a ProviderError."""
        message = provider_text(problem_message(maybe_json(response), response), self.settings.credential)
        status = response.status_code
        if job_id is None and status == 404:
            message = f"model not found: {message}"
        error = http_error(response, message, job_id=job_id, overrides=CREATE_STATUS_OVERRIDES if job_id is None else None)
        if status == 429 and error.retry_after is None:
            reset = _THROTTLE_RESET.search(message)  # "Your rate limit resets in ~30s."
            if reset:
                error = replace(error, retry_after=float(reset.group(1)))
        return error

    def _result(self, job: ImageJob, predictions: list[Mapping[str, Any]]) -> ProviderResult:
        ids = [str(p.get("id")) for p in predictions]
        images: list[GeneratedImage] = []
        predict_time = 0.0
        for index, (prediction, pid) in enumerate(zip(predictions, ids, strict=True)):
            output = prediction.get("output")
            uris = [output] if isinstance(output, str) else output  # klein: array of URIs; siblings: one URI
            if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
                raise ProviderError(FailureClass.FAILED, "prediction succeeded without image URIs", job_id=pid, billed=True)
            for uri in uris:
                try:
                    images.append(
                        output_image(
                            uri,
                            content_type=content_type_from_url(uri) or job.media_type,
                            width=job.width,
                            height=job.height,
                            seed=None if job.seed is None else job.seed + index,
                        )
                    )
                except ValueError:
                    raise ProviderError(FailureClass.FAILED, "prediction output has a malformed data: URI", job_id=pid, billed=True) from None
            metrics = prediction.get("metrics")
            seconds = metrics.get("predict_time") if isinstance(metrics, dict) else None
            if isinstance(seconds, (int, float)):
                predict_time += float(seconds)
        raw = {"prediction_ids": ids, "predict_time": predict_time}
        return ProviderResult(images=self.sizes_to_verify(images, job), seed=job.seed, job_id=",".join(ids), raw=raw)

    # ---- cancel and probe ----------------------------------------------------

    async def cancel(self, job_id: str) -> bool:
        """`POST /v1/predictions/{id}/cancel` for each id (comma-joined for n > 1); True if all accepted."""
        try:
            headers = self._auth()
        except ProviderError:
            return False
        ids = [pid for pid in job_id.split(",") if pid]

        async def one(pid: str) -> bool:
            url = f"{self.base}/v1/predictions/{quote(pid, safe='')}/cancel"
            try:
                response = await self.request("POST", url, deadline=time.monotonic() + self.settings.timeouts.request, job_id=pid, headers=headers)
            except ProviderError:
                return False
            return 200 <= response.status_code < 300

        results = await asyncio.gather(*(one(pid) for pid in ids))
        return bool(results) and all(results)

    async def probe(self) -> ProbeResult:
        """`GET /v1/models/{model}`: model metadata, free; 200 proves reachability and the token."""
        if not self.settings.credential:
            return ProbeResult(False, "no API token configured")
        started = time.monotonic()
        try:
            response = await self.request("GET", f"{self.base}/v1/models/{self.model}", deadline=started + self.opts.probe_timeout_s, headers=self._auth())
        except ProviderError as exc:
            return ProbeResult(False, f"unreachable: {exc.message}", time.monotonic() - started)
        latency = time.monotonic() - started
        status = response.status_code
        if status in CREDENTIAL_STATUSES:
            return ProbeResult(False, f"credentials rejected (HTTP {status})", latency, credentials_invalid=True)
        if status == 404:
            return ProbeResult(False, "model not found (HTTP 404)", latency)
        if status >= 400:
            return ProbeResult(False, f"HTTP {status}", latency)
        return ProbeResult(True, "reachable, token accepted", latency)
