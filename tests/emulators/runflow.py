"""Runflow model runs for black-forest-labs/flux-2-klein-4b (docs/providers/runflow.md).

    POST /v1/models/black-forest-labs/flux-2-klein-4b/runs        create (t2i)  -> run, status_code queued
    POST /v1/models/black-forest-labs/flux-2-klein-4b/edit/runs   create (edit)
    POST /v1/models/flux-2-klein-4b[/edit]/runs                   the short form RF-MODEL shows
    GET  /v1/runs/{id}                                            queued -> dispatching -> running -> succeeded | failed
    POST /v1/admin/runs/{id}/cancellation                         201 canceled, 200 already terminal (RF-CANCEL)
    GET  /v1/health                                               free, no key
    GET  /v1/billing/balance                                      free, with key

Body `{input, client_ref?, callback_url?, metadata?}`; output is normalised
`{outputs: [{url, type, width, height}], seed, nsfw_detected, timing}` and
`cost` is a decimal string (docs/providers/runflow.md#result). Errors are `{code, message, errors}`
(docs/providers/runflow.md#errors-and-their-classes).

Choices where the references are silent or disagree (docs/providers/runflow.md#choices-made):
- Create answers 201. Input is validated at create (422 VALIDATION_ERROR
  with `errors: [{field, message}]`).
- The canceled spelling is the knob `cancel_spelling` ("canceled" default).
- t2i input mirrors fal's (image_size preset or {width, height}; top-level
  width/height also accepted); edit takes `steps` or `num_inference_steps`,
  `image_urls` 1..4, optional `image_size` / `num_images`, and makes JPEG at
  1024x1024 unless told otherwise (RF-EDIT).
- `cost`: t2i $0.014 first MP + $0.001 per further MP per image (the FAQ's
  tiered price, docs/providers/runflow.md#price); edit $0.005 per image; "0" until the
  run succeeds (failed runs are not billed, RF-PRICE).
- 429 carries Retry-After (the older docs' promise; the newer say none).
- The balance endpoint's shape is not documented: `{balance, currency}`.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from gateway.domain.sizes import FAL_PRESETS
from tests.emulators.asgi import Request, Response, route
from tests.emulators.core import EmulatorApp
from tests.emulators.jobs import TERMINAL, Job, Spec

MODEL_ID = "black-forest-labs/flux-2-klein-4b"
FORMATS = ("jpeg", "png", "webp")
FIRST_MP_USD = Decimal("0.014")
EXTRA_MP_USD = Decimal("0.001")
EDIT_IMAGE_USD = Decimal("0.005")

CODES = {
    "missing_credentials": "UNAUTHORIZED",
    "unauthorized": "UNAUTHORIZED",
    "rate_limited": "RATE_LIMITED",
    "out_of_credit": "INSUFFICIENT_CREDIT",
    "not_found": "NOT_FOUND",
    "timeout": "GATEWAY_TIMEOUT",
    "method_not_allowed": "METHOD_NOT_ALLOWED",
    "bad_request": "BAD_REQUEST",
}
MESSAGES = {
    "missing_credentials": "Missing API key. Send it as Authorization: Bearer <key>.",
    "unauthorized": "Invalid API key.",
    "rate_limited": "Rate limit exceeded: too many requests, retry later.",
    "out_of_credit": "Insufficient credit. Check GET /v1/billing/balance.",
    "timeout": "The request timed out.",
}


class RunflowEmulator(EmulatorApp):
    provider = "runflow"

    def build_routes(self) -> list:
        routes = []
        for model in (MODEL_ID, "flux-2-klein-4b"):
            routes.append(route("POST", f"/v1/models/{model}/runs", "create", self.create, paid=True))
            routes.append(route("POST", f"/v1/models/{model}/edit/runs", "create_edit", self.create, paid=True))
        return routes + [
            route("GET", "/v1/runs/{id}", "get", self.get),
            route("POST", "/v1/admin/runs/{id}/cancellation", "cancel", self.cancel),
            route("GET", "/v1/health", "health", self.health, auth=False),
            route("GET", "/v1/billing/balance", "balance", self.balance),
        ]

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        if code == "server_error":
            rf_code = "MODEL_UNAVAILABLE" if status == 503 else "INTERNAL_ERROR"
            text = "The upstream provider is unavailable." if status == 503 else "Internal server error."
        else:
            rf_code = CODES.get(code, "BAD_REQUEST")
            text = MESSAGES.get(code, message)
        return Response.json(status, {"code": rf_code, "message": text, "errors": None}, headers)

    # ---- handlers -------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            return self.error(400, "bad_request", "Request body is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("input"), dict):
            return _invalid([("input", "input is required and must be an object")])
        edit = request.path.endswith("/edit/runs")
        spec, problems = parse_input(payload["input"], edit=edit, seed=self.new_seed())
        if problems:
            return _invalid(problems)
        safety = payload["input"].get("enable_safety_checker", True)
        nsfw = self.nsfw_flags(spec.n) if safety else ()
        job = self.jobs.create(spec, payload["input"], self.knobs.job, prefix="run_", stuck=request.fault == "stuck", failed=request.fault == "job_failed", nsfw=nsfw)
        if job.failed:
            code = self.knobs.faults.job_error_code or "PROVIDER_ERROR"
            job.failure = {"failure_code": code, "failure_message": "The upstream provider failed to generate the image.", "failure_stage_code": "execution"}
        job.extra.update(
            edit=edit,
            client_ref=payload.get("client_ref"),
            callback_url=payload.get("callback_url"),
            metadata=payload.get("metadata"),
            request_id="req_" + secrets.token_hex(8),
            safety=bool(safety),
        )
        self.count_generation(0 if job.failed else spec.n)
        return Response.json(201, await self.run(request, job))

    async def get(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return Response.json(404, {"code": "RUN_NOT_FOUND", "message": "Run not found.", "errors": None})
        return Response.json(200, await self.run(request, job))

    async def cancel(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return Response.json(404, {"code": "RUN_NOT_FOUND", "message": "Run not found.", "errors": None})
        if job.cancel() in TERMINAL:
            return Response.json(200, await self.run(request, job))
        self.stats.cancels += 1
        return Response.json(201, await self.run(request, job))

    async def health(self, request: Request) -> Response:
        return Response.json(200, {"status": "ok"})

    async def balance(self, request: Request) -> Response:
        return Response.json(200, {"balance": "100.00", "currency": "USD"})

    # ---- the run object -------------------------------------------------------

    async def run(self, request: Request, job: Job) -> dict[str, Any]:
        phase = job.phase()
        status = self.knobs.cancel_spelling if phase in ("canceled", "aborted") else phase
        terminal = phase in TERMINAL
        started = phase in ("running", "succeeded", "failed") or (phase in ("canceled",) and job.canceled_phase == "running")
        output = None
        cost = Decimal(0)
        if phase == "succeeded":
            images = job.images
            if images is None:
                images = job.images = await self.render_all(job.spec, job.nsfw)
            output = {
                "outputs": [{"url": self.file_url(request, im), "type": "image", "width": im.width, "height": im.height} for im in images],
                "seed": job.spec.seed,
                "model_data": {},
                "nsfw_detected": any(job.nsfw) if job.extra.get("safety") else None,
                "timing": {"inference_ms": round(job.run_s * 1000)},
            }
            cost = run_cost(job.spec, edit=bool(job.extra.get("edit"))) * Decimal(str(self.knobs.billed_cost_factor))
        body: dict[str, Any] = {
            "id": job.id,
            "model_id": MODEL_ID + ("/edit" if job.extra.get("edit") else ""),
            "target_type": "model",
            "status_code": status,
            "input": job.input,
            "output": output,
            "duration_ms": round((job.completed_wall - job.created_wall) * 1000) if terminal else None,
            "cost": _money(cost),
            "cost_breakdown": {"items": [{"description": "model run", "amount": _money(cost)}]} if cost else None,
            "client_ref": job.extra.get("client_ref"),
            "request_id": job.extra.get("request_id"),
            "created_at": _iso(job.created_wall),
            "started_at": _iso(job.started_wall) if started else None,
            "completed_at": _iso(job.completed_wall) if terminal else None,
            "callback_url": job.extra.get("callback_url"),
            "metadata": job.extra.get("metadata"),
            "links": {"self": f"{request.base_url()}/v1/runs/{job.id}"},
            "failure_code": None,
            "failure_message": None,
            "failure_stage_code": None,
            "node_runs": [],
            "logs": [],
        }
        if phase == "failed":
            body.update(job.failure)
            body["error"] = {"code": job.failure["failure_code"], "message": job.failure["failure_message"]}
        return body


def parse_input(data: dict[str, Any], *, edit: bool, seed: int) -> tuple[Spec, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        problems.append(("input.prompt", "prompt is required"))
        prompt = ""
    refs: list[Any] = []
    if edit:
        urls = data.get("image_urls")
        refs = urls if isinstance(urls, list) else []
        if not 1 <= len(refs) <= 4:
            problems.append(("input.image_urls", "between 1 and 4 source images are required"))
    width, height = (1024, 1024) if edit else (1024, 768)  # edit: RF-EDIT's 1024x1024; t2i: landscape_4_3
    size = data.get("image_size")
    if isinstance(size, str):
        if size in FAL_PRESETS:
            width, height = FAL_PRESETS[size]
        else:
            problems.append(("input.image_size", f"must be one of {', '.join(FAL_PRESETS)} or {{width, height}}"))
    elif isinstance(size, dict) or ("width" in data and "height" in data):
        source = size if isinstance(size, dict) else data
        w, h = source.get("width"), source.get("height")
        if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and not isinstance(h, bool) and 64 <= w <= 2048 and 64 <= h <= 2048:
            width, height = w, h
        else:
            problems.append(("input.image_size", "width and height must be integers between 64 and 2048"))
            width, height = 1024, 768
    elif size is not None:
        problems.append(("input.image_size", "must be a preset name or {width, height}"))
    n = data.get("num_images", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
        problems.append(("input.num_images", "must be between 1 and 4"))
        n = 1
    steps = data.get("num_inference_steps", data.get("steps", 4))
    max_steps = 25 if edit else 50  # RF-EDIT "up to 25 steps"; RF-LLMS 1-50
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= max_steps:
        problems.append(("input.num_inference_steps" if "num_inference_steps" in data else "input.steps", f"must be between 1 and {max_steps}"))
        steps = 4
    fmt = data.get("output_format", "jpeg" if edit else "png")
    if fmt not in FORMATS:
        problems.append(("input.output_format", "must be one of jpeg, png, webp"))
        fmt = "png"
    given = data.get("seed")
    if isinstance(given, int) and not isinstance(given, bool):
        seed = given
    return Spec(prompt=prompt, width=width, height=height, fmt=fmt, n=n, seed=seed, edit_refs=len(refs), steps=steps), problems


def run_cost(spec: Spec, *, edit: bool) -> Decimal:
    """What Runflow reports for a succeeded run (see the module docstring)."""
    if edit:
        return EDIT_IMAGE_USD * spec.n
    megapixels = Decimal(spec.width * spec.height) / Decimal(1_000_000)
    per_image = FIRST_MP_USD + max(Decimal(0), megapixels - 1) * EXTRA_MP_USD
    return per_image * spec.n


def _money(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


def _invalid(problems: list[tuple[str, str]]) -> Response:
    errors = [{"field": field, "message": message} for field, message in problems]
    return Response.json(422, {"code": "VALIDATION_ERROR", "message": "Input validation failed.", "errors": errors})


def _iso(wall: float) -> str:
    """ISO-8601 with a +00:00 offset, as Runflow writes it (https://docs.runflow.io/concepts/callbacks)."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
