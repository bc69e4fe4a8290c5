"""EmpirioLabs: FLUX.2 [klein] 4B behind an OpenAI-like, synchronous endpoint.

Protocol (docs/providers/empiriolabs.md, EL-MODEL): one
`POST {base}/v1/images/generations` with `Authorization: Bearer <key>` and a
JSON body (`model`, `prompt`, size, `num_inference_steps`, `guidance_scale`,
`seed`, `num_images`, `format`, `response_format`, `images`) answers with the
images. There is no job id, so a timeout on that call is UNKNOWN_OUTCOME with
nothing to follow (base.request), and there is nothing to cancel. Pricing is
per returned image ($0.0085, EL-MODEL) and the response reports no cost.

Choices where the documents are silent or disagree, each an option under the
backend's `options:` in providers.yaml:

- `model` (default `flux-2-klein-4b`): the model id (EL-MODEL).
- `size_field` (default `size`): `size` sends `"WxH"`, the documented
  "explicit WIDTHxHEIGHT override" used by the doc's own example; `width_height`
  sends the two numbers instead ("set width and height together").
- `response_format` (default `auto`): `auto` asks for `b64_json` when the caller
  wants base64 (no second download) and for `url` (signed for 7 days, EL-REF)
  otherwise; `url` or `b64_json` forces one.
- `jpeg_format` (default `jpeg`): the `format` value sent for JPEG; the doc
  allows both `jpg` and `jpeg`.
- `data_uri_refs` (default false): `images` is documented as reference image
  URLs only, so uploads (which would travel as data URIs) are not eligible
  here unless this is true.
- `verify_size` (default `header`): the response reports no image size, so the
  gateway reads the first 64 KB of each URL image (a Range request) and checks
  its header before handing the URL on; `off` trusts the requested size.
- `assume_requested_size` (default false): true is `verify_size: off`, kept
  for configurations written before that option.

Capabilities (EL-MODEL unless noted): sides 256 to 2048, at most 1,048,576
pixels per image, steps 1 to 12, 1 to 4 images, formats png/jpeg/webp. The doc
does not say sides must be multiples of 16; the model needs it (docs/design.md#model-limits-and-eligibility), so
16 it is. It does not say how many reference images `images` takes; 4, the
model's limit, is assumed.

Response: the exact JSON was not captured (docs/providers/empiriolabs.md#response). OpenAI's
`{"created", "data": [{"url" | "b64_json"}]}` is read, and, defensively,
`images: [...]` with objects or plain strings (URLs, data URIs or base64).
A URL's media type comes from its extension, else the `format` asked for;
inline base64 is kept as it came (its head is checked and sniffed). A `seed` or per-image `nsfw` flag is kept if the
response carries one (none is documented); every image flagged is
CONTENT_FILTERED.
Errors come in OpenAI's envelope `{"error": {"message", "type", "code"}}`;
the documented codes decide the class where the status alone would not:
`missing_api_key`/`invalid_api_key` (credentials), `insufficient_credits`,
`rate_limit_exceeded` and `model_unavailable` (refused before work),
`model_not_found` and `upstream_error` (failed). A 408 or 504 from this
synchronous call may hide work that finished and was billed: UNKNOWN_OUTCOME.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import MEDIA_TYPES, ImageJob, JobKind
from gateway.domain.media import sniff
from gateway.net.wire import WireResponse
from gateway.providers import register
from gateway.providers._images import checked_b64, content_type_from_url, data_uri_b64, is_data_uri, parse_data_uri, reference_uri
from gateway.providers._json import response_json
from gateway.providers._wire import CREDENTIAL_STATUSES, http_error, maybe_json, provider_text
from gateway.providers.base import (
    Adapter,
    EmulatorHook,
    FailureClass,
    GeneratedImage,
    ProbeResult,
    ProviderError,
    ProviderResult,
)
from gateway.providers.options import AdapterOptions

DEFAULT_MODEL = "flux-2-klein-4b"
PROBE_TIMEOUT_S = 10.0

DEFAULT_CAPABILITIES = Capabilities(
    min_side=256,
    max_side=2048,
    multiple_of=16,
    max_pixels=1_048_576,
    max_n=4,
    min_steps=1,
    max_steps=12,
    max_references=4,
    accepts_data_uri_refs=False,
    output_formats=frozenset({"png", "jpeg", "webp"}),
)

# Documented error codes whose meaning is sharper than their HTTP status.
CODE_FAILURES: dict[str, FailureClass] = {
    "missing_api_key": FailureClass.REFUSED,
    "invalid_api_key": FailureClass.REFUSED,
    "insufficient_credits": FailureClass.REFUSED,
    "rate_limit_exceeded": FailureClass.REFUSED,
    "model_unavailable": FailureClass.REFUSED,
    "model_not_found": FailureClass.FAILED,
    "upstream_error": FailureClass.FAILED,
}
CREDENTIAL_CODES = frozenset({"missing_api_key", "invalid_api_key"})


@dataclass(frozen=True, slots=True)
class EmpirioLabsOptions(AdapterOptions):
    """The adapter's options, validated; see the module docstring for each."""

    model: str = DEFAULT_MODEL
    size_field: Literal["size", "width_height"] = "size"
    response_format: Literal["auto", "url", "b64_json"] = "auto"
    jpeg_format: Literal["jpeg", "jpg"] = "jpeg"
    data_uri_refs: bool = False
    assume_requested_size: bool = False

    def validate(self, prefix: str) -> None:
        if not self.model.strip() or "/" in self.model:
            raise ValueError(f"{prefix}option model must be a model id such as flux-2-klein-4b")


# ---- request body (pure) ---------------------------------------------------------


def wire_response_format(job: ImageJob, opts: EmpirioLabsOptions) -> str:
    if opts.response_format != "auto":
        return opts.response_format
    return "b64_json" if job.response_format == "b64_json" else "url"


def reference_values(job: ImageJob, allow_data_uri: bool) -> list[str]:
    """`images`: reference URLs (documented), data URIs only when allowed."""
    if not allow_data_uri and any(not ref.url for ref in job.references):
        raise ProviderError(FailureClass.REJECTED, "needs reference images as public URLs, not uploads")
    return [reference_uri(ref) for ref in job.references]


def request_body(job: ImageJob, opts: EmpirioLabsOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"model": opts.model, "prompt": job.prompt}
    if opts.size_field == "size":
        body["size"] = job.size
    else:
        body["width"], body["height"] = job.width, job.height
    body["num_inference_steps"] = job.steps
    if job.guidance_scale is not None:
        body["guidance_scale"] = job.guidance_scale
    if job.seed is not None:
        body["seed"] = job.seed
    body["num_images"] = job.n
    body["format"] = opts.jpeg_format if job.output_format == "jpeg" else job.output_format
    body["response_format"] = wire_response_format(job, opts)
    if job.references:
        body["images"] = reference_values(job, opts.data_uri_refs)
    return body


# ---- response (pure) --------------------------------------------------------------


def error_fields(body: Any) -> tuple[str | None, str | None]:
    """(code, message) from OpenAI's (or Anthropic's) error envelope, or a flat one."""
    if not isinstance(body, Mapping):
        return None, None
    err = body.get("error")
    code = message = None
    if isinstance(err, Mapping):
        code, message = err.get("code") or err.get("type"), err.get("message")
    elif isinstance(err, str):
        message = err
    code = code or body.get("code")
    message = message or body.get("message") or body.get("detail")
    return (str(code) if code else None), (str(message) if message is not None else None)


def _inline_image(value: str, requested_type: str, width: int | None, height: int | None, nsfw: bool | None) -> GeneratedImage:
    """The image of a `b64_json` value, which may also come as a data: URI.

    Base64 is kept as it came, not decoded whole: its head is checked and
    sniffed, and results.py decodes the rest only if a transcode or a stored
    URL needs the bytes. A percent-encoded data: URI is decoded."""
    try:
        if is_data_uri(value):
            inline = data_uri_b64(value)
            if inline is None:
                data = parse_data_uri(value)[1]
                return GeneratedImage(data=data, content_type=sniff(data) or requested_type, width=width, height=height, nsfw=nsfw)
            value = inline[1]
        b64, head = checked_b64(value)
    except ValueError:
        raise ProviderError(FailureClass.FAILED, "returned base64 image data that cannot be decoded", billed=True) from None
    return GeneratedImage(b64=b64, content_type=sniff(head) or requested_type, width=width, height=height, nsfw=nsfw, b64_head=head)


def _item_image(item: Any, requested_type: str, size: tuple[int | None, int | None]) -> GeneratedImage | None:
    """One image from a `data[]` or `images[]` entry, or None if it holds none."""
    if isinstance(item, str):
        item = {"url": item} if item.startswith(("http://", "https://")) else {"b64_json": item}
    if not isinstance(item, Mapping):
        return None
    width = item.get("width") if isinstance(item.get("width"), int) else size[0]
    height = item.get("height") if isinstance(item.get("height"), int) else size[1]
    nsfw = item.get("nsfw") if isinstance(item.get("nsfw"), bool) else None
    b64 = item.get("b64_json") or item.get("b64") or item.get("base64")
    url = item.get("url")
    inline = b64 if isinstance(b64, str) and b64 else url if isinstance(url, str) and is_data_uri(url) else None
    if inline:
        return _inline_image(inline, requested_type, width, height, nsfw)
    if isinstance(url, str) and url:
        return GeneratedImage(url=url, content_type=content_type_from_url(url) or requested_type, width=width, height=height, nsfw=nsfw)
    return None


def extract_images(body: Any, requested_type: str, size: tuple[int | None, int | None] = (None, None)) -> list[GeneratedImage]:
    """Images from `data[]` (OpenAI-like), else `images[]`."""
    if not isinstance(body, Mapping):
        return []
    items = body.get("data")
    if not isinstance(items, list) or not items:
        items = body.get("images")
    if not isinstance(items, list):
        return []
    return [img for img in (_item_image(item, requested_type, size) for item in items) if img is not None]


# ---- the adapter ---------------------------------------------------------------------


@register
class EmpirioLabsAdapter(Adapter):
    kind: ClassVar[str] = "empiriolabs"
    credential_env: ClassVar[str | None] = "EMPIRIOLABS_API_KEY"
    base_url_env: ClassVar[str] = "KLEIN_EMPIRIOLABS_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://api.empiriolabs.ai"
    options_type = EmpirioLabsOptions
    default_capabilities: ClassVar[Capabilities] = DEFAULT_CAPABILITIES
    emulator: ClassVar[EmulatorHook | None] = EmulatorHook("tests.emulators.empiriolabs:EmpirioLabsEmulator", key_prefix="sk-empiriolabs-emu")
    opts: EmpirioLabsOptions

    @classmethod
    def capabilities_for(cls, options: Mapping[str, Any] | None = None, kind: JobKind | None = None) -> Capabilities:
        """Option-aware capabilities; the same endpoint serves both kinds."""
        opts = EmpirioLabsOptions.parse(options, cls.kind)
        return replace(DEFAULT_CAPABILITIES, accepts_data_uri_refs=opts.data_uri_refs)

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        if not self.settings.credential:
            raise ProviderError(FailureClass.REFUSED, "no API key configured", credentials_invalid=True)
        body = request_body(job, self.opts)
        resp = await self.request("POST", f"{self.base}/v1/images/generations", deadline=deadline, headers=self._auth(), json=body)
        if not resp.is_success:
            raise self._error(resp)
        try:
            payload = response_json(resp)
        except ValueError:
            # The synchronous work is done and billed; its answer is lost.
            raise ProviderError(FailureClass.FAILED, f"HTTP {resp.status_code}: response body is not JSON", status=resp.status_code, billed=True) from None
        size = (job.width, job.height) if self.opts.assume_requested_size else (None, None)
        images = extract_images(payload, MEDIA_TYPES[job.output_format], size)
        if not images:
            # Billing is per returned image (EL-MODEL): none returned, none billed.
            raise ProviderError(FailureClass.FAILED, f"HTTP {resp.status_code}: the response holds no image", status=resp.status_code)
        seed = payload.get("seed") if isinstance(payload.get("seed"), int) and not isinstance(payload.get("seed"), bool) else job.seed
        if seed is not None:
            images = [replace(img, seed=seed) for img in images]
        if all(img.nsfw is True for img in images):
            raise ProviderError(FailureClass.CONTENT_FILTERED, "every image was flagged by the safety checker", billed=True)
        raw = {k: payload[k] for k in ("created", "id", "model") if k in payload}
        if not self.opts.assume_requested_size:
            images = self.sizes_to_verify(images, job)
        return ProviderResult(images=images, seed=seed, raw=raw)

    def _error(self, resp: WireResponse) -> ProviderError:
        code, message = error_fields(maybe_json(resp))
        text = ": ".join(p for p in (code, message or resp.reason_phrase or "error") if p)
        # There is no job: the one call is the work, so a 408 or 504 may hide
        # an image made and billed, as after a submitted job.
        err = http_error(resp, self._scrub(text), submitted=True, code=code and self._scrub(code, 64))
        if code in CODE_FAILURES:  # a documented code names an end where nothing was made: not billed
            err = replace(err, failure=CODE_FAILURES[code], billed=False, credentials_invalid=err.credentials_invalid or code in CREDENTIAL_CODES)
        return err

    def _scrub(self, text: str, limit: int = 300) -> str:
        return provider_text(text, self.settings.credential, limit)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.credential}"}

    async def probe(self) -> ProbeResult:
        """`GET /v1/models/{model}`: the documented schema endpoint, free. It is
        sent with the key, so a revoked key shows up here too."""
        started = time.monotonic()
        headers = self._auth() if self.settings.credential else {}
        try:
            resp = await self.request("GET", f"{self.base}/v1/models/{self.opts.model}", deadline=started + PROBE_TIMEOUT_S, timeout=PROBE_TIMEOUT_S, headers=headers)
        except ProviderError as err:
            return ProbeResult(False, err.message, time.monotonic() - started)
        latency = time.monotonic() - started
        if resp.status_code in CREDENTIAL_STATUSES:
            return ProbeResult(False, f"HTTP {resp.status_code}: credentials rejected", latency, credentials_invalid=True)
        return ProbeResult(resp.is_success, f"HTTP {resp.status_code}", latency)
