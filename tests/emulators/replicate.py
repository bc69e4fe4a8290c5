"""Replicate predictions for black-forest-labs/flux-2-klein-4b (docs/providers/replicate.md).

    POST /v1/models/black-forest-labs/flux-2-klein-4b/predictions   create (Prefer: wait[=N], Cancel-After)
    POST /v1/predictions                                              create by version
    GET  /v1/predictions/{id}                                         the prediction
    POST /v1/predictions/{id}/cancel                                  cancel; returns the prediction
    GET  /v1/models/black-forest-labs/flux-2-klein-4b                 model metadata (free)
    GET  /v1/account                                                  the token's account (free)

Input: `aspect_ratio` and `output_megapixels` (strings) pick the size
(docs/providers/replicate.md#sizes, `sizes.replicate_size`); `output_format` jpg|png|webp (default
jpg); output is an array of one URI string. Errors are problem details
(docs/providers/replicate.md#errors-and-their-classes); a 429 says "Request was throttled..." with Retry-After.

Choices where the references are silent (docs/providers/replicate.md#choices-made):
- Create answers 201, with or without `Prefer: wait`; a prediction that has
  not finished within the wait comes back `starting` or `processing`.
- 422 for invalid input is problem details with `invalid_fields`.
- With the safety checker on, a prediction whose image is flagged fails with
  "All generated images contained NSFW content..." (how Replicate's FLUX
  models report it); it never reports per-image flags.
- `Cancel-After` takes Go-style durations (`45s`, `1m`, `1m30s`, `500ms`,
  or plain seconds): not started by then -> `aborted`, running -> `canceled`.
- `output_megapixels` takes "0.25", "0.5", "1", "2", "4".
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from tests.emulators.asgi import Request, Response, hold, route
from tests.emulators.core import EmulatorApp
from tests.emulators.jobs import TERMINAL, Job, Spec
from tests.emulators.sizes import REPLICATE_ASPECT_RATIOS, REPLICATE_MEGAPIXELS, data_uri_size, replicate_size

OWNER_NAME = "black-forest-labs/flux-2-klein-4b"
VERSION = "8e9c42d77b10a2a41af823ac4500f7545be6ebc4e745830fc3f3de10de200542"  # REP-K4B
MODEL_PATH = f"/v1/models/{OWNER_NAME}"
FORMATS = {"jpg": "jpg", "png": "png", "webp": "webp"}
NSFW_ERROR = "All generated images contained NSFW content. Try running it again with a different prompt."
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ReplicateEmulator(EmulatorApp):
    provider = "replicate"

    def build_routes(self) -> list:
        return [
            route("POST", MODEL_PATH + "/predictions", "create", self.create, paid=True),
            route("POST", "/v1/predictions", "create_by_version", self.create, paid=True),
            route("GET", "/v1/predictions/{id}", "get", self.get),
            route("POST", "/v1/predictions/{id}/cancel", "cancel", self.cancel),
            route("GET", MODEL_PATH, "model", self.model),
            route("GET", "/v1/account", "account", self.account),
        ]

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        if code == "missing_credentials":
            body = _problem(401, "Unauthenticated", "You did not pass an authentication token")
        elif code == "unauthorized":
            body = _problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        elif code == "rate_limited":
            seconds = (headers or {}).get("retry-after", "30")
            body = _problem(429, "Too Many Requests", f"Request was throttled. Your rate limit resets in ~{seconds}s.")
        elif code == "out_of_credit":
            body = _problem(402, "Insufficient credit", "You have insufficient credit to run this model. Go to https://replicate.com/account/billing to purchase credit.")
        elif code == "not_found":
            body = _problem(404, "Not found", "The requested resource could not be found.")
        elif code == "timeout":
            body = _problem(504, "Gateway Timeout", "The server did not answer in time.")
        elif code == "method_not_allowed":
            body = _problem(405, "Method Not Allowed", message)
        else:
            body = _problem(status, "Internal Server Error", "Something went wrong on our end. Please try again.")
        body["status"] = status
        return Response.json(status, body, headers)

    # ---- handlers -------------------------------------------------------------

    async def create(self, request: Request) -> Response | None:
        try:
            payload = await request.json()
        except ValueError:
            return self._invalid([("body", "json", "Request body is not valid JSON")])
        if not isinstance(payload, dict) or not isinstance(payload.get("input"), dict):
            return self._invalid([("input", "required", "input is required")])
        if request.path == "/v1/predictions" and not isinstance(payload.get("version"), str):
            return self._invalid([("version", "required", "version is required")])
        spec, problems = parse_input(payload["input"], seed=self.new_seed())
        if problems:
            return self._invalid(problems)
        safety = not payload["input"].get("disable_safety_checker", False)
        nsfw = self.nsfw_flags(1)
        flagged = safety and nsfw[0]
        job = self.jobs.create(spec, payload["input"], self.knobs.job, id_bytes=13, stuck=request.fault == "stuck", failed=request.fault == "job_failed" or flagged, nsfw=nsfw)
        if flagged:
            job.failure = {"error": NSFW_ERROR}
        elif job.failed:
            job.failure = {"error": "Prediction failed: the model raised an error while generating."}
        cancel_after = request.headers.get("cancel-after")
        if cancel_after:
            job.cancel_after_s = parse_duration(cancel_after)
        self.count_generation(0 if job.failed else 1)
        wait = parse_prefer_wait(request.headers.get("prefer"))
        if wait:
            remaining = job.seconds_until_done()
            if not await hold(request, wait if remaining is None else min(wait, remaining), self.release):
                return None
        return Response.json(201, await self.prediction(request, job))

    async def get(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return self.error(404, "not_found", "prediction not found")
        return Response.json(200, await self.prediction(request, job))

    async def cancel(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return self.error(404, "not_found", "prediction not found")
        if job.cancel() not in TERMINAL:
            self.stats.cancels += 1
        return Response.json(200, await self.prediction(request, job))

    async def model(self, request: Request) -> Response:
        base = "https://replicate.com/" + OWNER_NAME
        body = {
            "url": base,
            "owner": "black-forest-labs",
            "name": "flux-2-klein-4b",
            "description": "FLUX.2 [klein] 4B (emulated)",
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": self.stats.generations,
            "cover_image_url": None,
            "default_example": None,
            "latest_version": {"id": VERSION, "created_at": "2026-01-15T00:00:00.000000Z", "cog_version": "0.16.0", "openapi_schema": {}},
        }
        return Response.json(200, body)

    async def account(self, request: Request) -> Response:
        return Response.json(200, {"type": "organization", "username": "emulator", "name": "Klein emulator", "github_url": None})

    # ---- the prediction object ----------------------------------------------

    async def prediction(self, request: Request, job: Job) -> dict[str, Any]:
        phase = job.phase()
        status = {"queued": "starting", "dispatching": "starting", "running": "processing"}.get(phase, phase)
        base = request.base_url()
        output = error = None
        metrics: dict[str, Any] = {}
        if status == "succeeded":
            images = job.images
            if images is None:
                images = job.images = await self.render_all(job.spec)
            output = [self.file_url(request, image) for image in images]
            metrics = {"predict_time": job.run_s, "image_count": len(images)}
        elif status == "failed":
            error = job.failure.get("error")
            metrics = {"predict_time": job.run_s}
        started = status not in ("starting", "aborted")
        terminal = status in ("succeeded", "failed", "canceled", "aborted")
        return {
            "id": job.id,
            "model": OWNER_NAME,
            "version": "hidden",
            "input": job.input,
            "logs": "" if not started else f"Using seed: {job.spec.seed}\n",
            "output": output,
            "data_removed": False,
            "error": error,
            "status": status,
            "created_at": _iso(job.created_wall),
            "started_at": _iso(job.started_wall) if started else None,
            "completed_at": _iso(job.completed_wall) if terminal else None,
            "metrics": metrics,
            "urls": {
                "get": f"{base}/v1/predictions/{job.id}",
                "cancel": f"{base}/v1/predictions/{job.id}/cancel",
                "web": f"https://replicate.com/p/{job.id}",
            },
        }

    def _invalid(self, problems: list[tuple[str, str, str]]) -> Response:
        detail = "\n".join(f"- input.{field}: {text}" if field not in ("body", "input", "version") else f"- {text}" for field, _, text in problems)
        body = _problem(422, "Input validation failed", detail)
        body["invalid_fields"] = [{"type": kind, "field": f"input.{field}" if field not in ("body", "input", "version") else field, "description": text} for field, kind, text in problems]
        return Response.json(422, body)


def parse_input(data: dict[str, Any], *, seed: int) -> tuple[Spec, list[tuple[str, str, str]]]:
    problems: list[tuple[str, str, str]] = []
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        problems.append(("prompt", "required", "prompt is required"))
        prompt = ""
    ratio = data.get("aspect_ratio", "1:1")
    if ratio not in REPLICATE_ASPECT_RATIOS:
        problems.append(("aspect_ratio", "enum", f"aspect_ratio must be one of the following: {', '.join(REPLICATE_ASPECT_RATIOS)}"))
        ratio = "1:1"
    megapixels = data.get("output_megapixels", "1")
    if megapixels not in REPLICATE_MEGAPIXELS:
        problems.append(("output_megapixels", "enum", f"output_megapixels must be one of the following: {', '.join(REPLICATE_MEGAPIXELS)}"))
        megapixels = "1"
    fmt = data.get("output_format", "jpg")
    if fmt not in FORMATS:
        problems.append(("output_format", "enum", "output_format must be one of the following: webp, jpg, png"))
        fmt = "jpg"
    images = data.get("images", [])
    if not isinstance(images, list) or len(images) > 5:
        problems.append(("images", "array_max_items", "images must be an array of at most 5 URIs"))
        images = []
    quality = data.get("output_quality", 95)
    if not isinstance(quality, int) or isinstance(quality, bool) or not 0 <= quality <= 100:
        problems.append(("output_quality", "range", "output_quality must be between 0 and 100"))
    given = data.get("seed")
    if isinstance(given, int) and not isinstance(given, bool):
        seed = given
    first = data_uri_size(images[0]) if images else None
    width, height = replicate_size(ratio, megapixels, first)
    return Spec(prompt=prompt, width=width, height=height, fmt=fmt, seed=seed, edit_refs=len(images)), problems


def parse_prefer_wait(value: str | None) -> float:
    """`Prefer: wait` -> 60, `wait=N` -> N within 1..60; 0 when absent (docs/providers/replicate.md#request-body)."""
    if not value:
        return 0.0
    for part in value.split(","):
        part = part.strip().lower()
        if part == "wait":
            return 60.0
        if part.startswith("wait="):
            try:
                return float(min(60, max(1, int(part[5:]))))
            except ValueError:
                return 60.0
    return 0.0


def parse_duration(value: str) -> float | None:
    """A Go-style duration (`1m30s`, `45s`, `500ms`) or plain seconds; None if unreadable."""
    text = value.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"title": title, "detail": detail, "status": status}


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
