"""Runflow: FLUX.2 [klein] 4B as asynchronous model runs.

Protocol (docs/providers/runflow.md): create a run with
`POST {base}/v1/models/{model}/runs`, body `{"input": {...}, "client_ref"}`;
the answer is a run object with `id` and `status_code: "queued"`. Poll
`GET {base}/v1/runs/{id}` through `queued`, `dispatching`, `running` to a
terminal status: `succeeded`, `partial_succeeded`, `failed`, `canceled` or
`cancelled` (both spellings exist, docs/providers/runflow.md#status-flow). Auth is
`Authorization: Bearer <RUNFLOW_API_KEY>`, sent only to the configured base
URL: the run's `links` and its presigned output URLs are never followed with
the key (outputs are handed back as URLs; result shaping fetches them without
credentials).

Choices where the documents are silent or disagree, each an option under the
backend's `options:` in providers.yaml:

- `model` (default `black-forest-labs/flux-2-klein-4b`): the model path of the
  text-to-image run. The docs name the full provider/slug form (RF-DOCS); RF-MODEL
  shows a short `flux-2-klein-4b` (docs/providers/runflow.md#choices-made).
- `edit_model` (default `<model>/edit`): the edit endpoint's path (RF-EDIT).
- `image_size` (default `object`): how a size is sent. The schema lists only
  fal presets but says "alternatively width/height" without naming fields; the
  wrapper mirrors fal's schema, so `object` sends `{"width", "height"}` as fal's
  `ImageSize` does and every size is exact. `preset` sends a preset name when
  the size is one of the six presets (the pixel table is third-party
  consensus, docs/providers/fal.md#capabilities-and-sizes) and the object otherwise. `preset_only` sends preset
  names only, so only those six sizes are eligible.
- `send_guidance_scale` (default false): `guidance_scale` appears in the legacy
  llms.txt (RF-LLMS) but not in the current schema (RF-DOCS); the distilled model
  ignores it, so it is sent only when this is true and the caller set one.
- `edit_steps_field` (default `steps`): the 4B edit endpoint documents `steps`
  (RF-EDIT) where fal-shaped wrappers use `num_inference_steps` (docs/providers/runflow.md#choices-made):
  `steps`, `num_inference_steps` or `both`.
- `edit_size_field` (default none): the 4B edit endpoint documents only
  `prompt, image_urls, seed, steps` and prices "per image, 1024x1024, up to 25
  steps" (RF-EDIT). With no size field its only documented size is 1024x1024,
  so edits are eligible at exactly that size. `image_size` sends fal's
  `{"width", "height"}` object instead and allows any size up to
  `edit_max_pixels`.
- `edit_max_pixels` (default 1,048,576): the pixel cap for edits when a size
  field is sent; the documented price holds up to 1024x1024.
- `edit_max_steps` (default 25): the documented step limit of the edit price.
- `edit_num_images` (default false): the edit endpoint documents no
  `num_images`; edits are single-image unless this sends it (n up to 4).
- `data_uri_refs` (default true): RF-EDIT says image_urls take URLs or base64.
  Inline data URIs become `runflow://` refs that some workers refused with 422
  (RF-JS backend-contract); https URLs are always preferred when the caller gave
  one. False makes uploads ineligible here.
- `admin_cancel` (default false): there is no public cancel (RF-CANCEL); true
  uses `POST /v1/admin/runs/{id}/cancellation`, which needs an admin
  (`rf_svc_`) key and does not stop upstream inference.
- `poll_not_found_limit` (default 3): consecutive 404s on the run before it is
  given up as lost (a freshly created run may not be readable at once).

Behaviour where the protocol leaves room:

- Polling keeps going through 5xx, 429 (after its Retry-After) and unreadable
  bodies, as the SDK does (docs/providers/runflow.md#status-flow), until the deadline, which ends in
  UNKNOWN_OUTCOME carrying the run id. A poll whose connection drops or times
  out is retried twice in a row before the outcome is declared unknown. An
  unknown status is treated as still running.
- A create that answers 2xx without a readable run id is UNKNOWN_OUTCOME (the
  run probably exists and may be billed, but cannot be followed).
- A create that answers 404 means the model path is wrong for this account:
  FAILED, so it counts against health, not REJECTED.
- `failed` with `INPUT_VALIDATION_FAILED` is REJECTED, any other failure FAILED;
  failed runs are not billed (RF-PRICE). A cancelled run we did not cancel is
  FAILED and may be billed (billing follows the upstream job, RF-CANCEL).
- `partial_succeeded` returns whatever images came back if there is at least
  one; result shaping decides whether fewer than asked is acceptable.
- Images whose `nsfw_detected` flag is true are reported as such; if every
  image is flagged the attempt is CONTENT_FILTERED (billed).
- `cost` (a decimal string) becomes `reported_cost_usd`.
- An output's media type is taken from the output entry or its URL's
  extension, else left unknown (edits: JPEG, as documented), so the gateway
  checks the bytes before it hands a URL on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx

from gateway.domain.capabilities import Capabilities, eligible
from gateway.domain.job import ImageJob, JobKind
from gateway.net.wire import WireResponse
from gateway.providers import register
from gateway.providers._images import content_type_from_url, output_image, reference_uri
from gateway.providers._json import response_json
from gateway.providers._wire import StatusOverrides, as_outcome_unknown, follow_job, http_error, maybe_json, provider_text
from gateway.providers.base import (
    Adapter,
    AdapterSettings,
    EmulatorHook,
    FailureClass,
    GeneratedImage,
    ProbeResult,
    ProviderError,
    ProviderResult,
    deadline_error,
    note_job_id,
    note_progress,
    parse_retry_after,
)
from gateway.providers.options import AdapterOptions, VerifySize

DEFAULT_MODEL = "black-forest-labs/flux-2-klein-4b"
PROBE_TIMEOUT_S = 10.0
POLL_TRANSPORT_RETRIES = 2  # a dropped poll is retried this many times in a row
EDIT_DOCUMENTED_SIZE = (1024, 1024)  # RF-EDIT: "per image, 1024x1024, up to 25 steps"

# fal's presets, which Runflow's wrapper takes (RF-LLMS, RF-DOCS); pixel sizes are
# third-party consensus (docs/providers/fal.md#capabilities-and-sizes).
PRESETS: dict[tuple[int, int], str] = {
    (1024, 1024): "square_hd",
    (512, 512): "square",
    (768, 1024): "portrait_4_3",
    (576, 1024): "portrait_16_9",
    (1024, 768): "landscape_4_3",
    (1024, 576): "landscape_16_9",
}

# Run statuses (docs/providers/runflow.md#status-flow).
SUCCEEDED = frozenset({"succeeded", "partial_succeeded"})
FAILED = "failed"
CANCELED = frozenset({"canceled", "cancelled"})
TERMINAL = SUCCEEDED | CANCELED | {FAILED}
VALIDATION_FAILURE_CODES = frozenset({"INPUT_VALIDATION_FAILED"})
# A create's 404 means the model path is wrong for this account, not the
# input: FAILED, so it counts against health (the shared table says REJECTED).
CREATE_STATUS_OVERRIDES: StatusOverrides = {404: FailureClass.FAILED}


@dataclass(frozen=True, slots=True)
class RunflowOptions(AdapterOptions):
    """The adapter's options, validated; see the module docstring for each."""

    model: str = DEFAULT_MODEL
    verify_size: VerifySize = "reported"  # a run's `outputs[]` documents width and height
    edit_model: str | None = None
    image_size: Literal["object", "preset", "preset_only"] = "object"
    send_guidance_scale: bool = False
    edit_steps_field: Literal["steps", "num_inference_steps", "both"] = "steps"
    edit_size_field: Literal["image_size"] | None = None
    edit_max_pixels: int = 1024 * 1024
    edit_max_steps: int = 25
    edit_num_images: bool = False
    data_uri_refs: bool = True
    admin_cancel: bool = False
    poll_not_found_limit: int = 3

    def validate(self, prefix: str) -> None:
        for name in ("model", "edit_model"):
            value = getattr(self, name)
            if value is not None:
                _model_path(value, name)
        for name in ("edit_max_pixels", "edit_max_steps", "poll_not_found_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}option {name} must be a positive integer")

    @property
    def edit_path(self) -> str:
        return self.edit_model or f"{self.model}/edit"


def _model_path(model: str, option: str = "model") -> str:
    """The model id as URL path segments, each encoded; the SDK rejects empty,
    `.` and `..` segments (docs/providers/runflow.md#endpoints)."""
    if not isinstance(model, str):
        raise ValueError(f"runflow: option {option} must be a string")
    segments = model.strip("/").split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise ValueError(f"runflow: option {option} has an empty, '.' or '..' path segment: {model!r}")
    return "/".join(quote(seg, safe="") for seg in segments)


# ---- capabilities ------------------------------------------------------------

TEXT_TO_IMAGE_CAPABILITIES = Capabilities()  # model-wide limits; RF-LLMS: n 1-4, steps 1-50


def capabilities_for_options(opts: RunflowOptions, kind: JobKind | None = None) -> Capabilities:
    """Limits for one kind of job (None: the text-to-image endpoint's, which is
    what a single per-backend capability set describes)."""
    caps = replace(TEXT_TO_IMAGE_CAPABILITIES, accepts_data_uri_refs=opts.data_uri_refs)
    if opts.image_size == "preset_only":
        caps = replace(caps, exact_sizes=frozenset(PRESETS))
    if kind is not JobKind.EDIT:
        return caps
    edit = replace(
        caps,
        max_steps=min(caps.max_steps, opts.edit_max_steps),
        max_n=caps.max_n if opts.edit_num_images else 1,
        output_formats=frozenset({"jpeg"}),  # RF-EDIT: output format JPEG
    )
    if opts.edit_size_field is None:
        return replace(edit, exact_sizes=frozenset({EDIT_DOCUMENTED_SIZE}))
    return replace(edit, exact_sizes=None, max_pixels=min(caps.max_pixels, opts.edit_max_pixels))


# ---- request bodies (pure) -----------------------------------------------------


def image_size_value(width: int, height: int, mode: str) -> str | dict[str, int]:
    """`image_size` for a size: a preset name or fal's {width, height} object."""
    preset = PRESETS.get((width, height))
    if mode in ("preset", "preset_only") and preset is not None:
        return preset
    return {"width": width, "height": height}


def reference_values(job: ImageJob, allow_data_uri: bool) -> list[str]:
    """`image_urls`: the caller's https URL where there is one, else a data URI."""
    if not allow_data_uri and any(not ref.url for ref in job.references):
        raise ProviderError(FailureClass.REJECTED, "needs reference images as public URLs, not uploads")
    return [reference_uri(ref) for ref in job.references]


def run_input(job: ImageJob, opts: RunflowOptions) -> dict[str, Any]:
    """The `input` object for a text-to-image or an edit run."""
    if job.kind is JobKind.EDIT:
        body: dict[str, Any] = {"prompt": job.prompt, "image_urls": reference_values(job, opts.data_uri_refs)}
        if opts.edit_steps_field in ("steps", "both"):
            body["steps"] = job.steps
        if opts.edit_steps_field in ("num_inference_steps", "both"):
            body["num_inference_steps"] = job.steps
        if opts.edit_size_field == "image_size":
            body["image_size"] = {"width": job.width, "height": job.height}
        if opts.edit_num_images:
            body["num_images"] = job.n
    else:
        body = {
            "prompt": job.prompt,
            "image_size": image_size_value(job.width, job.height, opts.image_size),
            "num_images": job.n,
            "num_inference_steps": job.steps,
            "output_format": job.output_format,
            "enable_safety_checker": job.enable_safety_checker,
        }
        if opts.send_guidance_scale and job.guidance_scale is not None:
            body["guidance_scale"] = job.guidance_scale
    if job.seed is not None:
        body["seed"] = job.seed
    return body


# ---- responses (pure) ------------------------------------------------------------


def run_status(run: Mapping[str, Any]) -> str:
    """`status_code`, or `status` as in the errors doc's example (docs/providers/runflow.md#status-flow)."""
    value = run.get("status_code") or run.get("status") or ""
    return str(value).strip().lower()


def error_fields(body: Any) -> tuple[str | None, str | None]:
    """(code, message) from `{"code", "message", "errors"}` or `{"error": {...}}`."""
    if not isinstance(body, Mapping):
        return None, None
    code = message = None
    errors: Any = body.get("errors")
    err = body.get("error")
    if isinstance(err, Mapping):
        code, message = err.get("code"), err.get("message")
        errors = errors or err.get("errors")
    elif isinstance(err, str):
        message = err
    code = code or body.get("code")
    message = message or body.get("message") or body.get("detail")
    message = str(message) if message is not None else None
    details = _field_errors(errors)
    if details:
        message = f"{message}: {details}" if message else details
    return (str(code) if code else None), message


def _field_errors(errors: Any) -> str:
    if not isinstance(errors, list):
        return ""
    parts = []
    for item in errors[:3]:
        if isinstance(item, Mapping):
            where = item.get("field") or item.get("path") or item.get("loc") or ""
            if isinstance(where, list):
                where = ".".join(str(p) for p in where)
            what = item.get("message") or item.get("msg") or item.get("code") or ""
            parts.append(f"{where}: {what}" if where else str(what))
        else:
            parts.append(str(item))
    return "; ".join(p for p in parts if p)


def failure_fields(run: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(code, message) of a failed run: `failure_code`/`failure_message`, else
    the SDK's `error: {code, message}`, else an error envelope in `output`."""
    code, message = run.get("failure_code"), run.get("failure_message")
    if not code or not message:
        c2, m2 = error_fields(run)
        if (not c2 and not m2) and isinstance(run.get("output"), Mapping):
            c2, m2 = error_fields(run["output"])
        code, message = code or c2, message or m2
    return (str(code) if code else None), (str(message) if message else None)


def parse_cost(value: Any) -> Decimal | None:
    """The run's `cost` (a string such as "0.005"); None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        cost = Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation:
        return None
    return cost if cost.is_finite() and cost >= 0 else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _seed(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _nsfw_flags(output: Mapping[str, Any], count: int) -> list[bool | None]:
    flag = output.get("nsfw_detected", output.get("has_nsfw_concepts"))
    if isinstance(flag, bool):
        return [flag] * count
    if isinstance(flag, list):
        return [flag[i] if i < len(flag) and isinstance(flag[i], bool) else None for i in range(count)]
    return [None] * count


def extract_images(output: Any, default_type: str | None) -> list[GeneratedImage]:
    """Images from a run's output, in the SDK's extractor order (docs/providers/runflow.md#result):
    `outputs[].url`, then `image_urls[]`, `image.url`, `url`, `output_url`;
    then the legacy fal-shaped `images[]` (docs/providers/runflow.md#result)."""
    if isinstance(output, list):
        output = {"outputs": output}
    if not isinstance(output, Mapping):
        return []
    found: list[tuple[str, int | None, int | None, str | None]] = []
    outputs = output.get("outputs")
    if isinstance(outputs, list):
        for item in outputs:
            if isinstance(item, Mapping) and isinstance(item.get("url"), str) and item.get("type", "image") == "image":
                found.append((item["url"], _int(item.get("width")), _int(item.get("height")), item.get("content_type")))
    if not found and isinstance(output.get("image_urls"), list):
        found = [(u, None, None, None) for u in output["image_urls"] if isinstance(u, str)]
    if not found and isinstance(output.get("image"), Mapping) and isinstance(output["image"].get("url"), str):
        img = output["image"]
        found = [(img["url"], _int(img.get("width")), _int(img.get("height")), img.get("content_type"))]
    for key in ("url", "output_url"):
        if not found and isinstance(output.get(key), str):
            found = [(output[key], None, None, None)]
    if not found and isinstance(output.get("images"), list):
        for item in output["images"]:
            if isinstance(item, str):
                found.append((item, None, None, None))
            elif isinstance(item, Mapping) and isinstance(item.get("url"), str):
                found.append((item["url"], _int(item.get("width")), _int(item.get("height")), item.get("content_type")))
    seed = _seed(output.get("seed"))
    flags = _nsfw_flags(output, len(found))
    images = []
    for (url, w, h, ctype), flag in zip(found, flags, strict=True):
        media = (ctype if isinstance(ctype, str) else None) or content_type_from_url(url) or default_type
        try:  # an inline data: URI (sync_mode outputs) becomes bytes
            images.append(output_image(url, content_type=media, width=w, height=h, nsfw=flag, seed=seed))
        except ValueError:
            raise ProviderError(FailureClass.FAILED, "run returned a malformed data: URI", billed=True) from None
    return images


# ---- the adapter ---------------------------------------------------------------


@register
class RunflowAdapter(Adapter):
    kind: ClassVar[str] = "runflow"
    credential_env: ClassVar[str | None] = "RUNFLOW_API_KEY"
    base_url_env: ClassVar[str] = "KLEIN_RUNFLOW_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://api.runflow.io"
    options_type = RunflowOptions
    default_capabilities: ClassVar[Capabilities] = TEXT_TO_IMAGE_CAPABILITIES
    emulator: ClassVar[EmulatorHook | None] = EmulatorHook("tests.emulators.runflow:RunflowEmulator", key_prefix="rf_live_emu")
    opts: RunflowOptions

    def __init__(self, settings: AdapterSettings, client: httpx.AsyncClient) -> None:
        super().__init__(settings, client)
        self.create_urls = {
            JobKind.GENERATE: f"{self.base}/v1/models/{_model_path(self.opts.model)}/runs",
            JobKind.EDIT: f"{self.base}/v1/models/{_model_path(self.opts.edit_path)}/runs",
        }

    @classmethod
    def capabilities_for(cls, options: Mapping[str, Any] | None = None, kind: JobKind | None = None) -> Capabilities:
        """Option-aware capabilities; pass `kind=JobKind.EDIT` for the edit endpoint's."""
        return capabilities_for_options(RunflowOptions.parse(options, cls.kind), kind)

    # -- generate --

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        self._require_key()
        if job.kind is JobKind.EDIT:
            ok = eligible(job, capabilities_for_options(self.opts, JobKind.EDIT))
            if not ok:
                raise ProviderError(FailureClass.REJECTED, f"edit endpoint: {ok.reason}")
        body = {"input": run_input(job, self.opts), "client_ref": job.request_id}
        resp = await self.request("POST", self.create_urls[job.kind], deadline=deadline, headers=self._auth(), json=body)
        if not resp.is_success:
            raise self._create_error(resp)
        run = self._created_run(resp)
        run_id = str(run["id"])
        note_job_id(run_id, self.name)  # from here on the run may bill: dispatch can cancel it if the caller leaves
        if run_status(run) not in TERMINAL:
            run = await self._follow(run_id, deadline)
        return self._outcome(run, run_id, job)

    resumable: ClassVar[bool] = True

    async def resume(self, job: ImageJob, job_ids: Sequence[str], deadline: float) -> ProviderResult:
        """Follow a run created earlier, by its id, to its outcome."""
        self._require_key()
        if len(job_ids) != 1:
            raise ProviderError(FailureClass.FAILED, f"expected one Runflow run id to resume, got {len(job_ids)}")
        return self._outcome(await self._follow(job_ids[0], deadline), job_ids[0], job)

    def _created_run(self, resp: WireResponse) -> Mapping[str, Any]:
        try:
            run = response_json(resp)
        except ValueError:
            run = None
        if not isinstance(run, Mapping) or not run.get("id"):
            raise ProviderError(
                FailureClass.UNKNOWN_OUTCOME,
                f"HTTP {resp.status_code}: run created but its id could not be read",
                status=resp.status_code,
                billed=True,
            )
        return run

    async def _follow(self, run_id: str, deadline: float) -> Mapping[str, Any]:
        """Poll the run until it is terminal; transient trouble only delays."""
        url = f"{self.base}/v1/runs/{quote(run_id, safe='')}"
        not_found = dropped = 0

        async def poll() -> Mapping[str, Any] | None:
            nonlocal not_found, dropped
            try:
                resp = await self.request("GET", url, deadline=deadline, job_id=run_id, headers=self._auth())
            except ProviderError:
                dropped += 1
                if dropped > POLL_TRANSPORT_RETRIES:
                    raise
                return None
            dropped = 0
            status = resp.status_code
            if status >= 500 or status == 429:
                await self._wait_retry_after(resp, deadline, run_id)
                return None
            if status == 404:
                not_found += 1
                if not_found >= self.opts.poll_not_found_limit:
                    raise self._lost_run(resp, run_id)
                return None
            not_found = 0
            if not resp.is_success:
                raise self._lost_run(resp, run_id)
            try:
                run = response_json(resp)
            except ValueError:
                return None  # an unreadable poll answer is transient, like a 5xx
            if isinstance(run, Mapping) and run_status(run) in TERMINAL:
                return run
            if isinstance(run, Mapping):
                note_progress(self.name, run_status(run))
            return None

        return await follow_job(poll, timeouts=self.settings.timeouts, deadline=deadline, job_id=run_id, wait_first=True)

    async def _wait_retry_after(self, resp: WireResponse, deadline: float, run_id: str) -> None:
        wait = parse_retry_after(resp.headers.get("retry-after"))
        if not wait:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_error(run_id)
        await asyncio.sleep(min(wait, remaining))

    def _outcome(self, run: Mapping[str, Any], run_id: str, job: ImageJob) -> ProviderResult:
        status = run_status(run)
        cost = parse_cost(run.get("cost"))
        if status in SUCCEEDED:
            output = run.get("output")
            # The edit endpoint documents JPEG output (RF-EDIT); a text-to-image
            # output's type is only claimed when the provider or the URL says it.
            default_type = "image/jpeg" if job.kind is JobKind.EDIT else None
            images = extract_images(output if output is not None else run, default_type)
            if not images:
                raise ProviderError(FailureClass.FAILED, f"run {status} without any image", job_id=run_id, billed=cost is None or cost > 0)
            if all(img.nsfw is True for img in images):
                raise ProviderError(FailureClass.CONTENT_FILTERED, "every image was flagged by the safety checker", job_id=run_id, billed=True)
            seed = images[0].seed if images[0].seed is not None else job.seed
            return ProviderResult(images=self.sizes_to_verify(images, job), seed=seed, job_id=run_id, reported_cost_usd=cost, raw=_summary(run))
        code, message = failure_fields(run)
        text = self._scrub(": ".join(p for p in (code, message) if p) or "no reason given")
        if status in CANCELED:
            raise ProviderError(FailureClass.FAILED, f"run was {status}: {text}"[:500], job_id=run_id, billed=cost is None or cost > 0, code=code and self._scrub(code, 64))
        failure = FailureClass.REJECTED if code in VALIDATION_FAILURE_CODES else FailureClass.FAILED
        # RF-PRICE: failed runs are not billed, unless the run itself reports a charge.
        raise ProviderError(failure, f"run failed: {text}"[:500], job_id=run_id, billed=bool(cost), code=code and self._scrub(code, 64))

    # -- errors --

    def _create_error(self, resp: WireResponse) -> ProviderError:
        return self._http_error(resp, overrides=CREATE_STATUS_OVERRIDES)

    def _lost_run(self, resp: WireResponse, run_id: str) -> ProviderError:
        """An error answer while following a run: the run may still go on (and bill)."""
        return as_outcome_unknown(self._http_error(resp, run_id), run_id)

    def _http_error(self, resp: WireResponse, run_id: str | None = None, *, overrides: StatusOverrides | None = None) -> ProviderError:
        code, message = error_fields(maybe_json(resp))
        text = ": ".join(p for p in (code, message or resp.reason_phrase or "error") if p)
        return http_error(resp, self._scrub(text), job_id=run_id, code=code and self._scrub(code, 64), overrides=overrides)

    def _scrub(self, text: str, limit: int = 300) -> str:
        return provider_text(text, self.settings.credential, limit)

    def _require_key(self) -> None:
        if not self.settings.credential:
            raise ProviderError(FailureClass.REFUSED, "no API key configured", credentials_invalid=True)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.credential}"}

    # -- probe and cancel --

    async def probe(self) -> ProbeResult:
        """`GET /v1/health` (docs/providers/runflow.md#probe): free, and sent without the key."""
        started = time.monotonic()
        try:
            resp = await self.request("GET", f"{self.base}/v1/health", deadline=started + PROBE_TIMEOUT_S, timeout=PROBE_TIMEOUT_S)
        except ProviderError as err:
            return ProbeResult(False, err.message, time.monotonic() - started)
        latency = time.monotonic() - started
        return ProbeResult(resp.is_success, f"HTTP {resp.status_code}", latency)

    async def cancel(self, job_id: str) -> bool | None:
        """Only through the admin endpoint, and only when `admin_cancel` is on
        (None otherwise: no cancel): 201 means cancelled, 200 means the run
        was already terminal."""
        if not self.opts.admin_cancel or not job_id or not self.settings.credential:
            return None
        url = f"{self.base}/v1/admin/runs/{quote(job_id, safe='')}/cancellation"
        try:
            resp = await self.request(
                "POST",
                url,
                deadline=time.monotonic() + PROBE_TIMEOUT_S,
                job_id=job_id,
                headers=self._auth(),
                json={"reason": "cancelled by the gateway: deadline passed or outcome unknown"},
            )
        except ProviderError:
            return False
        return resp.status_code == 201


def _summary(run: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("id", "status_code", "status", "cost", "cost_breakdown", "duration_ms", "model_id")
    return {k: run[k] for k in keys if k in run}
