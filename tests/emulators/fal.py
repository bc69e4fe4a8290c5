"""fal.ai queue API for fal-ai/flux-2/klein/4b (docs/providers/fal.md).

    POST /fal-ai/flux-2/klein/4b            submit (t2i)       -> IN_QUEUE + URLs
    POST /fal-ai/flux-2/klein/4b/edit       submit (edit)
    GET  /fal-ai/flux-2/requests/{id}/status                   -> IN_QUEUE | IN_PROGRESS | COMPLETED
    GET  /fal-ai/flux-2/requests/{id}                          -> v4Output, or 422 {"detail": [...]}
    PUT  /fal-ai/flux-2/requests/{id}/cancel                   -> 202 CANCELLATION_REQUESTED, ...

Status, result and cancel live under owner/alias only (docs/providers/fal.md#endpoints). Auth is
`Authorization: Key <FAL_KEY>` (docs/providers/fal.md#authentication).

Choices where the references are silent (docs/providers/fal.md#choices-made):
- Input is validated when the job runs, not at submit: a bad input is
  accepted, goes IN_PROGRESS -> COMPLETED with `error`/`error_type`, and the
  result fetch answers 422 with a detail list (docs/providers/fal.md#status-flow).
- Result before completion: 400 {"detail": "Request is still in progress"}.
- Cancel: 202 CANCELLATION_REQUESTED while queued or running (the job then
  reads COMPLETED with error_type `request_cancelled`), 400 ALREADY_COMPLETED
  once done, 404 NOT_FOUND for an unknown id.
- Width/height of a custom image_size: 64..2048; num_images 1..4; an edit
  without image_size takes the first data: URI's size, else 1024x1024.
- `X-Fal-Request-Timeout` is honoured: a job no runner started by then reads
  COMPLETED with error_type `request_timeout`, and its result is 504 with
  `X-Fal-Request-Timeout-Type` (not billed; docs/providers/fal.md#errors-and-their-classes).
- Exhausted balance is 403 {"detail": "User is locked. Reason: Exhausted balance..."}.
"""

from __future__ import annotations

from typing import Any

from gateway.domain.sizes import FAL_PRESETS
from tests.emulators.asgi import Request, Response, route
from tests.emulators.core import EmulatorApp
from tests.emulators.jobs import TERMINAL, Job, Spec
from tests.emulators.sizes import data_uri_size

ENDPOINT = "/fal-ai/flux-2/klein/4b"
REQUESTS = "/fal-ai/flux-2/requests"
FORMATS = ("jpeg", "png", "webp")

# fal request-error codes by status (docs/providers/fal.md#errors-and-their-classes)
ERROR_TYPES = {500: "internal_error", 502: "runner_disconnected", 503: "runner_scheduling_failure", 504: "request_timeout"}


class FalEmulator(EmulatorApp):
    provider = "fal"
    auth_scheme = "Key"

    def build_routes(self) -> list:
        return [
            route("POST", ENDPOINT, "submit", self.submit, paid=True),
            route("POST", ENDPOINT + "/edit", "submit_edit", self.submit, paid=True),
            route("GET", REQUESTS + "/{id}/status", "status", self.status),
            route("GET", REQUESTS + "/{id}", "result", self.result),
            route("PUT", REQUESTS + "/{id}/cancel", "cancel", self.cancel),
        ]

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        headers = dict(headers or {})
        if code == "missing_credentials":
            body: dict[str, Any] = {"detail": "Authentication is required to access this application."}
        elif code == "unauthorized":
            body = {"detail": "No user found for Key ID and Secret"}
        elif code == "out_of_credit":
            status = 403
            body = {"detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."}
        elif code == "rate_limited":
            body = {"detail": "Too many requests", "error_type": "rate_limited"}
        elif code in ("server_error", "timeout"):
            error_type = ERROR_TYPES.get(status, "internal_error")
            body = {"detail": message, "error_type": error_type}
            headers["x-fal-error-type"] = error_type
        elif code == "not_found":
            body = {"detail": "Request not found" if "request" in message.lower() else "Not Found"}
        else:
            body = {"detail": message}
        return Response.json(status, body, headers)

    # ---- handlers -------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            return _validation(["body"], "Input should be a valid JSON object", "json_invalid")
        if not isinstance(payload, dict):
            return _validation(["body"], "Input should be a valid dictionary", "dict_type")
        edit = request.path.endswith("/edit")
        spec, problems = parse_input(payload, edit=edit, seed=self.new_seed())
        nsfw = self.nsfw_flags(spec.n)
        failed = bool(problems) or request.fault == "job_failed"
        job = self.jobs.create(spec, payload, self.knobs.job, stuck=request.fault == "stuck", failed=failed, nsfw=nsfw)
        if problems:
            job.failure = {"detail": problems, "error": problems[0]["msg"], "error_type": problems[0]["type"]}
        elif failed:
            code = self.knobs.faults.job_error_code or "generation_failed"
            message = "Generation failed: the runner raised an error"
            job.failure = {"detail": [{"loc": ["body"], "msg": message, "type": code}], "error": message, "error_type": code}
        job.extra["sync_mode"] = bool(payload.get("sync_mode"))
        job.start_deadline_s = _start_timeout(request.headers.get("x-fal-request-timeout"))
        self.count_generation(0 if failed else spec.n)
        body = self._urls(request, job) | {"status": "IN_QUEUE", "queue_position": 0}
        return Response.json(200, body, {"x-fal-request-id": job.id})

    async def status(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return self.error(404, "not_found", "request not found")
        phase = job.phase()
        body = self._urls(request, job)
        logs: list[dict[str, Any]] | None = [] if "logs=1" in request.query or "logs=true" in request.query else None
        if phase in ("queued", "dispatching"):
            body |= {"status": "IN_QUEUE", "queue_position": 0}
        elif phase == "running":
            body |= {"status": "IN_PROGRESS", "logs": logs}
        else:
            body |= {"status": "COMPLETED", "logs": logs, "metrics": {"inference_time": job.run_s}}
            if phase == "canceled":
                body |= {"error": "Request was cancelled", "error_type": "request_cancelled"}
            elif phase == "aborted":
                body |= {"error": "Request timed out before a runner started it", "error_type": "request_timeout"}
            elif phase == "failed":
                body |= {"error": job.failure["error"], "error_type": job.failure["error_type"]}
        return Response.json(200, body, {"x-fal-request-id": job.id})

    async def result(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return self.error(404, "not_found", "request not found")
        phase = job.phase()
        if phase == "canceled":
            return Response.json(400, {"detail": "Request was cancelled", "error_type": "request_cancelled"})
        if phase == "aborted":
            headers = {"x-fal-error-type": "request_timeout", "x-fal-request-timeout-type": "user"}
            return Response.json(504, {"detail": "Request timed out before a runner started it", "error_type": "request_timeout"}, headers)
        if phase == "failed":
            return Response.json(422, {"detail": job.failure["detail"]}, {"x-fal-retryable": "false", "x-fal-request-id": job.id})
        if phase != "succeeded":
            return Response.json(400, {"detail": "Request is still in progress"})
        images = job.images
        if images is None:
            images = job.images = await self.render_all(job.spec, job.nsfw)
        inline = job.extra.get("sync_mode")
        out = [
            {
                "url": image.data_uri() if inline else self.file_url(request, image),
                "content_type": image.content_type,
                "file_name": image.file_name,
                "file_size": len(image.data),
                "width": image.width,
                "height": image.height,
            }
            for image in images
        ]
        body = {
            "images": out,
            "seed": job.spec.seed,
            "has_nsfw_concepts": list(job.nsfw),
            "prompt": job.spec.prompt,
            "timings": {"inference": job.run_s},
        }
        return Response.json(200, body, {"x-fal-request-id": job.id})

    async def cancel(self, request: Request) -> Response:
        job = self.jobs.get(request.params[0])
        if job is None:
            return Response.json(404, {"status": "NOT_FOUND"})
        was = job.cancel()
        if was in TERMINAL:
            return Response.json(400, {"status": "ALREADY_COMPLETED"})
        self.stats.cancels += 1
        if was in ("queued", "dispatching"):  # removed from the queue: it never runs, never bills
            return Response.json(200, {"status": "OK"})
        return Response.json(202, {"status": "CANCELLATION_REQUESTED"})  # a running one is only signalled

    def _urls(self, request: Request, job: Job) -> dict[str, Any]:
        base = f"{request.base_url()}{REQUESTS}/{job.id}"
        return {"request_id": job.id, "response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}


def parse_input(payload: dict[str, Any], *, edit: bool, seed: int) -> tuple[Spec, list[dict[str, Any]]]:
    """The job's Spec and fal-style validation problems (empty when valid)."""
    problems: list[dict[str, Any]] = []

    def bad(field: str, msg: str, kind: str) -> None:
        problems.append({"loc": ["body", field], "msg": msg, "type": kind})

    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        bad("prompt", "Field required", "missing")
        prompt = ""
    refs = payload.get("image_urls")
    if edit:
        if not isinstance(refs, list) or not refs:
            bad("image_urls", "Field required", "missing")
            refs = []
        elif len(refs) > 4:
            bad("image_urls", "List should have at most 4 items after validation", "too_long")
    else:
        refs = []
    size = payload.get("image_size")
    width, height = 1024, 768  # landscape_4_3, the t2i default
    if size is None and edit:
        width, height = (data_uri_size(refs[0]) if refs else None) or (1024, 1024)
    elif isinstance(size, str):
        if size in FAL_PRESETS:
            width, height = FAL_PRESETS[size]
        else:
            bad("image_size", f"Input should be one of {', '.join(FAL_PRESETS)}", "enum")
    elif isinstance(size, dict):
        width, height = size.get("width", 512), size.get("height", 512)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or not 64 <= value <= 2048:
                bad("image_size", f"{name} should be an integer between 64 and 2048", "image_size_out_of_range")
        if problems:
            width, height = 1024, 768
    elif size is not None:
        bad("image_size", "Input should be a preset name or {width, height}", "type_error")
    n = payload.get("num_images", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
        bad("num_images", "Input should be between 1 and 4", "less_than_equal")
        n = 1
    fmt = payload.get("output_format", "png")
    if fmt not in FORMATS:
        bad("output_format", "Input should be 'jpeg', 'png' or 'webp'", "enum")
        fmt = "png"
    steps = payload.get("num_inference_steps", 4)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 50:
        bad("num_inference_steps", "Input should be between 1 and 50", "less_than_equal")
        steps = 4
    given_seed = payload.get("seed")
    if isinstance(given_seed, int) and not isinstance(given_seed, bool):
        seed = given_seed
    return Spec(prompt=prompt, width=width, height=height, fmt=fmt, n=n, seed=seed, edit_refs=len(refs), steps=steps), problems


def _start_timeout(value: str | None) -> float | None:
    """X-Fal-Request-Timeout: seconds, more than 1 (docs/providers/fal.md#request-body); else ignored."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds > 1 else None


def _validation(loc: list[str], msg: str, kind: str) -> Response:
    return Response.json(422, {"detail": [{"loc": loc, "msg": msg, "type": kind}]}, {"x-fal-retryable": "false"})
