"""EmpirioLabs' synchronous, OpenAI-like image API for flux-2-klein-4b (docs/providers/empiriolabs.md).

    POST /v1/images/generations        -> {created, data: [{url} | {b64_json}]}
    GET  /v1/models                    the catalogue (free)
    GET  /v1/models/flux-2-klein-4b    the model's schema (free)

Limits enforced (EL-MODEL): W*H <= 1,048,576; width/height 256..2048 each;
num_inference_steps 1..12; guidance_scale 0..8; num_images (alias n) 1..4;
format webp|png|jpg|jpeg (default webp); response_format url|b64_json
(`return_base64: true` is an alias for b64_json).

Choices where the references are silent (docs/providers/empiriolabs.md#choices-made):
- Success is OpenAI's `{created, data}` plus `output_format`, `size` and the
  `seed` used (extra keys OpenAI clients ignore).
- Errors are OpenAI's envelope `{"error": {message, type, code, param}}`.
  A body that is not JSON or lacks `prompt` is 400 (`invalid_request_error`);
  a value outside a documented limit is 422 (code `parameter_out_of_range`,
  `param` naming it); an unknown model is 404 `model_not_found`.
- Keys: `Authorization: Bearer <key>`, and `x-api-key: <key>` as the second
  header style the docs mention but do not name.
- `images` takes an array or a comma-separated string, at most 4.
- No per-image NSFW flag exists in the documented response; nsfw_rate has
  no effect here.
- The `aspect_ratio` pixels (no `size`, no width/height) are `sizes.EMPIRIOLABS_ASPECT`.
- Reference URLs on loopback (the gateway lending an upload a signed URL) are
  downloaded before any work, as the provider would, and recorded in
  `references_fetched`; one that does not answer 200 with an image is 400
  `invalid_image_url` (param `images`). Other URLs are not fetched: the
  emulator never reaches beyond this machine.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import httpx
from PIL import Image

from tests.emulators.asgi import Request, Response, hold, route
from tests.emulators.core import EmulatorApp
from tests.emulators.jobs import Spec
from tests.emulators.sizes import EMPIRIOLABS_ASPECT, parse_size

MODEL = "flux-2-klein-4b"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
FETCH_TIMEOUT_S = 10.0
MAX_PIXELS = 1_048_576
FORMATS = ("webp", "png", "jpg", "jpeg")

ERRORS = {
    "missing_credentials": ("authentication_error", "missing_api_key", "Missing API key. Pass it as Authorization: Bearer sk-empiriolabs-..."),
    "unauthorized": ("authentication_error", "invalid_api_key", "Invalid API key provided."),
    "out_of_credit": ("insufficient_quota", "insufficient_credits", "Insufficient credits. Top up your account to continue."),
    "rate_limited": ("rate_limit_error", "rate_limit_exceeded", "Rate limit exceeded: 50 requests per minute per account."),
    "timeout": ("server_error", "upstream_error", "The upstream model did not answer in time."),
    "not_found": ("invalid_request_error", "not_found", "Not found."),
    "method_not_allowed": ("invalid_request_error", "method_not_allowed", "Method not allowed."),
}


class EmpirioLabsEmulator(EmulatorApp):
    provider = "empiriolabs"
    sync = True

    def build_routes(self) -> list:
        return [
            route("POST", "/v1/images/generations", "generate", self.generate, paid=True),
            route("GET", "/v1/models", "models", self.models),
            route("GET", f"/v1/models/{MODEL}", "model", self.model),
        ]

    def credential(self, request: Request) -> str | None:
        return super().credential(request) or request.headers.get("x-api-key") or None

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        if code == "server_error":
            if status == 503:
                kind, el_code, text = "server_error", "model_unavailable", "The model is temporarily unavailable."
            elif status == 502:
                kind, el_code, text = "server_error", "upstream_error", "The upstream provider returned an error."
            else:
                kind, el_code, text = "server_error", "internal_error", "Internal server error."
        else:
            kind, el_code, text = ERRORS.get(code, ("invalid_request_error", code, message))
        return _envelope(status, text, kind, el_code, None, headers)

    # ---- handlers -------------------------------------------------------------

    async def generate(self, request: Request) -> Response | None:
        try:
            payload = await request.json()
        except ValueError:
            return _envelope(400, "Request body must be a JSON object.", "invalid_request_error", "invalid_json")
        if not isinstance(payload, dict):
            return _envelope(400, "Request body must be a JSON object.", "invalid_request_error", "invalid_json")
        model = payload.get("model", MODEL)
        if model != MODEL:
            return _envelope(404, f"The model '{model}' does not exist.", "invalid_request_error", "model_not_found", "model")
        spec, problem = parse_body(payload, seed=self.new_seed())
        if problem is not None:
            status, param, text = problem
            code = "parameter_out_of_range" if status == 422 else "invalid_parameter"
            return _envelope(status, text, "invalid_request_error", code, param)
        failed = await self.fetch_references(payload.get("images"))
        if failed is not None:
            return _envelope(400, failed, "invalid_request_error", "invalid_image_url", "images")
        work = self.knobs.job
        if not await hold(request, (work.queue_ms + work.run_ms) / 1000, self.release):
            return None
        if request.fault == "job_failed":
            self.count_generation(0)
            return _envelope(502, "The upstream provider returned an error.", "server_error", self.knobs.faults.job_error_code or "upstream_error")
        images = await self.render_all(spec)
        self.count_generation(len(images))
        b64 = payload.get("response_format") == "b64_json" or payload.get("return_base64") is True
        data = [{"b64_json": im.b64()} if b64 else {"url": self.file_url(request, im)} for im in images]
        body = {"created": int(time.time()), "data": data, "output_format": spec.fmt, "size": f"{spec.width}x{spec.height}", "seed": spec.seed}
        return Response.json(200, body)

    async def fetch_references(self, refs: Any) -> str | None:
        """Download every loopback reference URL; a message for the first that fails."""
        if isinstance(refs, str):
            refs = [r for r in refs.split(",") if r.strip()]
        urls = [r for r in refs if isinstance(r, str) and urlsplit(r).hostname in LOOPBACK_HOSTS] if isinstance(refs, list) else []
        if not urls:
            return None
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
            for url in urls:
                try:
                    resp = await client.get(url)
                except httpx.HTTPError as exc:
                    self.stats.references_fetched.append({"url": url, "status": None, "size": None, "sha256": None})
                    return f"Could not download reference image: {type(exc).__name__}."
                size = _image_size(resp.content) if resp.status_code == 200 else None
                digest = hashlib.sha256(resp.content).hexdigest() if size else None
                self.stats.references_fetched.append({"url": url, "status": resp.status_code, "size": size, "sha256": digest})
                if size is None:
                    return f"Could not download reference image: HTTP {resp.status_code}."
        return None

    async def models(self, request: Request) -> Response:
        return Response.json(200, {"object": "list", "data": [_model_card()]})

    async def model(self, request: Request) -> Response:
        card = _model_card() | {
            "endpoint": "/v1/images/generations",
            "pricing": {"unit": "image", "usd": "0.0085"},
            "parameters": {
                "width": {"min": 256, "max": 2048},
                "height": {"min": 256, "max": 2048},
                "max_pixels": MAX_PIXELS,
                "num_inference_steps": {"min": 1, "max": 12, "default": 4},
                "guidance_scale": {"min": 0, "max": 8, "default": 1.0},
                "num_images": {"min": 1, "max": 4, "default": 1},
                "format": {"enum": list(FORMATS), "default": "webp"},
                "response_format": {"enum": ["url", "b64_json"], "default": "url"},
                "aspect_ratio": {"enum": list(EMPIRIOLABS_ASPECT), "default": "1:1"},
            },
        }
        return Response.json(200, card)


def parse_body(body: dict[str, Any], *, seed: int) -> tuple[Spec, tuple[int, str, str] | None]:
    """The Spec, or (status, param, message) for the first problem."""
    dummy = Spec(prompt="", width=1024, height=1024)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return dummy, (400, "prompt", "prompt is required.")
    width, height = EMPIRIOLABS_ASPECT["1:1"]
    if "width" in body or "height" in body:
        w, h = body.get("width"), body.get("height")
        if not (_number(w) and _number(h)):
            return dummy, (400, "width", "width and height must be set together, as numbers.")
        width, height = int(w), int(h)
    elif body.get("size") is not None:
        parsed = parse_size(body["size"])
        if parsed is None:
            return dummy, (400, "size", "size must look like WIDTHxHEIGHT, e.g. 1024x1024.")
        width, height = parsed
    elif body.get("aspect_ratio") is not None:
        if body["aspect_ratio"] not in EMPIRIOLABS_ASPECT:
            return dummy, (422, "aspect_ratio", f"aspect_ratio must be one of {', '.join(EMPIRIOLABS_ASPECT)}.")
        width, height = EMPIRIOLABS_ASPECT[body["aspect_ratio"]]
    for name, side in (("width", width), ("height", height)):
        if not 256 <= side <= 2048:
            return dummy, (422, name, f"{name} must be between 256 and 2048.")
    if width * height > MAX_PIXELS:
        return dummy, (422, "size", f"width x height must be at most {MAX_PIXELS} pixels; {width}x{height} is {width * height}.")
    steps = body.get("num_inference_steps", 4)
    if not _number(steps) or not 1 <= steps <= 12:
        return dummy, (422, "num_inference_steps", "num_inference_steps must be between 1 and 12.")
    guidance = body.get("guidance_scale", 1.0)
    if not _number(guidance) or not 0 <= guidance <= 8:
        return dummy, (422, "guidance_scale", "guidance_scale must be between 0 and 8.")
    n = body.get("num_images", body.get("n", 1))
    if not _number(n) or not 1 <= n <= 4:
        return dummy, (422, "num_images", "num_images must be between 1 and 4.")
    fmt = body.get("format", "webp")
    if fmt not in FORMATS:
        return dummy, (422, "format", f"format must be one of {', '.join(FORMATS)}.")
    response_format = body.get("response_format", "url")
    if response_format not in ("url", "b64_json"):
        return dummy, (422, "response_format", "response_format must be url or b64_json.")
    refs = body.get("images") or []
    if isinstance(refs, str):
        refs = [r for r in refs.split(",") if r.strip()]
    if not isinstance(refs, list) or len(refs) > 4:
        return dummy, (422, "images", "images takes at most 4 reference image URLs.")
    given = body.get("seed")
    if _number(given) and int(given) == given:
        seed = int(given)
    return Spec(prompt=prompt, width=width, height=height, fmt=fmt, n=int(n), seed=seed, edit_refs=len(refs), steps=int(steps)), None


def _image_size(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"{im.size[0]}x{im.size[1]}"
    except Exception:  # noqa: BLE001 - anything unreadable is "not an image"
        return None


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _model_card() -> dict[str, Any]:
    return {"id": MODEL, "object": "model", "created": 1767225600, "owned_by": "black-forest-labs"}


def _envelope(status: int, message: str, kind: str, code: str, param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"error": {"message": message, "type": kind, "code": code, "param": param}}, headers)
