"""EmulatorApp: what every provider emulator shares.

One request goes: admin or /files (no auth, no faults, not in the protocol
stats) | route match -> count -> latency -> credentials -> fault -> handler.
Provider modules supply the routes, the credential scheme and the shape of
their errors; everything else (knobs, stats, faults, image store, jobs,
the admin API) lives here.

Admin API (under `/_admin/`, which no provider uses):
    GET  /_admin/knobs    current knobs
    POST /_admin/knobs    JSON merge onto the knobs; 400 naming a bad field
    GET  /_admin/stats    counters (see Stats), plus `jobs`, `jobs_succeeded` and
                          `jobs_open` (not ended yet; async providers)
    POST /_admin/reset    stats, jobs and knobs back to how they started
                          (body {"keep_knobs": true} keeps the knobs)

With the `trickle` knob on, protocol responses and /files bodies are sent in
small chunks with a pause between them (`send_trickled`).
"""

from __future__ import annotations

import asyncio
import copy
import random
import secrets
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tests.emulators.asgi import JSON, Request, Response, Route, hold, loads, match, reset_connection, send_response
from tests.emulators.images import EXT_MEDIA_TYPES, ImageStore, StoredImage
from tests.emulators.jobs import JobBook, Spec
from tests.emulators.knobs import JOB_FAULTS, EmulatorKnobs

# A 200 whose JSON body stops half way, as a proxy that cut the stream would leave it.
MALFORMED_BODY = b'{"id": "emu_truncated", "status": "succeeded", "output": [{"url": "http://127.0.0'


@dataclass
class Stats:
    """Counters tests and benchmarks assert on.

    `generations` counts paid work created (a fal/Replicate/Runflow job, an
    EmpirioLabs or local generation); `free_calls` every protocol call that
    creates none (polls, results, probes, model metadata, health, cancels).
    A health probe that costs nothing leaves `generations` unchanged."""

    requests: Counter[str] = field(default_factory=Counter)  # by route name
    paid_calls: int = 0
    free_calls: int = 0
    generations: int = 0
    images: int = 0
    cancels: int = 0  # cancels that stopped a job
    auth_failures: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    not_found: int = 0
    files_served: int = 0
    # Reference URLs the emulator downloaded, as a provider would: {url, status, size, sha256}.
    references_fetched: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "paid_calls": self.paid_calls,
            "free_calls": self.free_calls,
            "generations": self.generations,
            "images": self.images,
            "cancels": self.cancels,
            "auth_failures": self.auth_failures,
            "faults": dict(self.faults),
            "not_found": self.not_found,
            "files_served": self.files_served,
            "references_fetched": list(self.references_fetched),
        }


class EmulatorApp(ABC):
    """An ASGI app speaking one provider's protocol."""

    provider: ClassVar[str]
    auth_scheme: ClassVar[str] = "Bearer"
    sync: ClassVar[bool] = False  # True: generation happens inside the request

    def __init__(self, key: str | None, knobs: EmulatorKnobs | None = None, *, image_cache_entries: int = 256, image_cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.key = key
        self.initial_knobs = copy.deepcopy(knobs or EmulatorKnobs())
        self.initial_knobs.validate()
        self.knobs = copy.deepcopy(self.initial_knobs)
        self.rng = random.Random(self.knobs.seed)
        self.stats = Stats()
        self.images = ImageStore(self.provider, image_cache_entries, image_cache_bytes)
        self.jobs = JobBook()
        self.routes: list[Route] = self.build_routes()
        self._release: asyncio.Event | None = None

    # ---- what a provider module supplies --------------------------------------

    @abstractmethod
    def build_routes(self) -> list[Route]: ...

    @abstractmethod
    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        """A response in the provider's error shape. `code` is one of:
        unauthorized, missing_credentials, rate_limited, server_error,
        out_of_credit, timeout, not_found, method_not_allowed, bad_request."""

    def credential(self, request: Request) -> str | None:
        """The key the caller presented, in this provider's scheme."""
        value = request.headers.get("authorization")
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != self.auth_scheme.lower() or not token.strip():
            return None
        return token.strip()

    # ---- ASGI entry -----------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive, send)
        path = request.path
        response: Response | None
        if path.startswith("/_admin/"):
            response = await self.admin(request)
        elif path.startswith("/files/"):
            response = self.serve_file(request)
        else:
            response = await self.dispatch(request)
        if response is None:
            return
        trickle = self.knobs.trickle
        if trickle.chunk_bytes > 0 and not path.startswith("/_admin/"):
            await send_trickled(request, response, trickle.chunk_bytes, trickle.interval_ms / 1000, self.release)
        else:
            await send_response(send, response)

    async def dispatch(self, request: Request) -> Response | None:
        route, params, path_known = match(self.routes, request.method, request.path)
        if route is None:
            self.stats.not_found += 1
            if path_known:
                return self.error(405, "method_not_allowed", f"method {request.method} not allowed")
            return self.error(404, "not_found", "not found")
        request.params = params
        stats = self.stats
        stats.requests[route.name] += 1
        if route.paid:
            stats.paid_calls += 1
        else:
            stats.free_calls += 1
        knobs = self.knobs
        delay = knobs.latency.sample_s(self.rng)
        if delay > 0 and not await hold(request, delay, self.release):
            return None
        if route.auth and self.key is not None:
            presented = self.credential(request)
            if presented is None or not secrets.compare_digest(presented.encode(), self.key.encode()):
                stats.auth_failures += 1
                if presented is None:
                    return self.error(401, "missing_credentials", "missing credentials")
                return self.error(401, "unauthorized", "invalid credentials")
        fault = self.pick_fault(route)
        if fault is not None:
            stats.faults[fault] += 1
            if fault == "stuck" and self.sync:
                fault = "timeout"
            if fault not in JOB_FAULTS:
                return await self.http_fault(request, fault)
            request.fault = fault
        return await route.handler(request)

    # ---- faults ---------------------------------------------------------------

    def pick_fault(self, route: Route) -> str | None:
        faults = self.knobs.faults
        if not route.paid and faults.scope != "all":
            return None
        if faults.queue:
            head = faults.queue[0]
            if head in JOB_FAULTS and not route.paid:
                return None
            faults.queue.pop(0)
            return None if head == "none" else head
        rates = faults.rates()
        if not rates:
            return None
        roll = self.rng.random()
        for kind, rate in rates:
            roll -= rate
            if roll < 0:
                return kind if (route.paid or kind not in JOB_FAULTS) else None
        return None

    async def http_fault(self, request: Request, fault: str) -> Response | None:
        faults = self.knobs.faults
        if fault == "reset":
            await request.body()
            await reset_connection(request)
            return None
        if fault == "timeout":
            if not await hold(request, faults.timeout_hold_s, self.release):
                return None
            return self.error(504, "timeout", "the request timed out")
        if fault == "malformed":
            return Response(200, MALFORMED_BODY, JSON)
        if fault == "rate_limited":
            return self.error(429, "rate_limited", "rate limited", {"retry-after": _retry_after(faults.retry_after_s)})
        if fault == "out_of_credit":
            return self.error(402, "out_of_credit", "insufficient credit")
        return self.error(faults.server_error_status, "server_error", "internal error")

    # ---- helpers for provider modules -------------------------------------------

    @property
    def release(self) -> asyncio.Event:
        """Set on close: held requests (timeouts, stuck waits) end at once."""
        if self._release is None:
            self._release = asyncio.Event()
        return self._release

    def close(self) -> None:
        """Release every held request; call from the app's event loop."""
        self.release.set()

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def new_seed(self) -> int:
        return self.rng.randrange(2**31)

    def nsfw_flags(self, n: int) -> tuple[bool, ...]:
        rate = self.knobs.nsfw_rate
        return tuple(self.roll(rate) for _ in range(n))

    async def render_all(self, spec: Spec, nsfw: tuple[bool, ...] = ()) -> list[StoredImage]:
        """The job's images; a cache miss renders in a worker thread so the
        event loop keeps serving other requests meanwhile."""
        out = []
        pad = self.knobs.pad_to_bytes
        for i in range(spec.n):
            args = (spec.width, spec.height, spec.fmt, spec.prompt, _label(spec, i, bool(nsfw[i]) if i < len(nsfw) else False), pad)
            image = self.images.cached(*args)
            if image is None:
                image = await asyncio.to_thread(self.images.render, *args)
            out.append(image)
        return out

    def file_url(self, request: Request, image: StoredImage) -> str:
        return f"{request.base_url()}/files/{image.file_name}"

    def count_generation(self, images: int) -> None:
        self.stats.generations += 1
        self.stats.images += images

    # ---- /files and /_admin ---------------------------------------------------

    def serve_file(self, request: Request) -> Response:
        name = request.path[len("/files/") :]
        image_id, _, ext = name.partition(".")
        image = self.images.get(image_id)
        if request.method != "GET" or image is None or image.ext != ext:
            return Response(404, b"not found", b"text/plain")
        self.stats.files_served += 1
        return Response(200, image.data, EXT_MEDIA_TYPES.get(ext, image.content_type).encode(), {"cache-control": "private, max-age=3600"})

    async def admin(self, request: Request) -> Response:
        what = request.path[len("/_admin/") :].rstrip("/")
        method = request.method
        if what == "knobs" and method == "GET":
            return Response.json(200, self.knobs.to_dict())
        if what == "knobs" and method == "POST":
            try:
                patch = await request.json()
                self.set_knobs(self.knobs.merge(patch))
            except ValueError as exc:
                return Response.json(400, {"error": str(exc)})
            return Response.json(200, self.knobs.to_dict())
        if what == "stats" and method == "GET":
            body = self.stats.to_dict() | {
                "provider": self.provider,
                "jobs": len(self.jobs),
                "jobs_succeeded": self.jobs.succeeded(),
                "jobs_open": self.jobs.open(),
                "image_renders": self.images.renders,
            }
            return Response.json(200, body)
        if what == "reset" and method == "POST":
            raw = await request.body()
            keep = bool(raw) and bool(_safe_loads(raw).get("keep_knobs"))
            self.reset(keep_knobs=keep)
            return Response.json(200, {"reset": True, "kept_knobs": keep})
        return Response.json(404, {"error": f"no admin endpoint {method} /_admin/{what}"})

    def set_knobs(self, knobs: EmulatorKnobs) -> None:
        if knobs.seed != self.knobs.seed:
            self.rng = random.Random(knobs.seed)
        self.knobs = knobs

    def reset(self, *, keep_knobs: bool = False) -> None:
        self.stats = Stats()
        self.jobs.clear()
        if not keep_knobs:
            self.set_knobs(copy.deepcopy(self.initial_knobs))
            self.rng = random.Random(self.knobs.seed)


async def send_trickled(request: Request, response: Response, chunk_bytes: int, interval_s: float, release: asyncio.Event) -> None:
    """Send `response` `chunk_bytes` at a time, pausing `interval_s` between
    chunks; stops when the client hangs up or the emulator closes."""
    body = response.body
    headers = response.headers + [(b"content-length", str(len(body)).encode())]
    await request.send({"type": "http.response.start", "status": response.status, "headers": headers})
    for start in range(0, max(len(body), 1), chunk_bytes):
        if start and not await hold(request, interval_s, release):
            return
        chunk = body[start : start + chunk_bytes]
        await request.send({"type": "http.response.body", "body": chunk, "more_body": start + chunk_bytes < len(body)})


def _label(spec: Spec, index: int, nsfw: bool) -> str:
    # no seed in the label: it would defeat the cache (seeds are random per request)
    label = "emulated"
    if spec.n > 1:
        label += f"  {index + 1}/{spec.n}"
    if spec.edit_refs:
        label += f"  edit of {spec.edit_refs}"
    if nsfw:
        label += "  NSFW-flagged"
    return label


def _retry_after(seconds: float) -> str:
    """Retry-After in whole seconds, as HTTP allows (at least 1 when non-zero)."""
    if seconds <= 0:
        return "0"
    return str(max(1, round(seconds)))


def _safe_loads(raw: bytes) -> dict[str, Any]:
    try:
        value = loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
