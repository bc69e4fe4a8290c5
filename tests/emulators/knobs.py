"""EmulatorKnobs: what an emulator does besides speaking its protocol.

Knobs are set at start and changed at run time through `POST /_admin/knobs`
(a JSON merge onto the current knobs, see `merge`). Everything defaults to
"fast and healthy": no latency, no faults, jobs finish at once, so a test or
a benchmark only turns on what it measures.

Time in the knobs is milliseconds (`*_ms`) or seconds (`*_s`), as named.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

LatencyKind = Literal["fixed", "uniform", "lognormal"]

# The faults an emulator can inject. HTTP-level faults replace the response;
# job-level faults (stuck, job_failed) mark the job a create call makes.
FaultKind = Literal[
    "server_error",  # 5xx in the provider's error shape (status: Faults.server_error_status)
    "rate_limited",  # 429 in the provider's shape, with Retry-After
    "out_of_credit",  # 402 (fal: 403 "Exhausted balance") in the provider's shape
    "timeout",  # hold the connection past the client's timeout, then 504
    "reset",  # close the socket without any response (TCP RST)
    "malformed",  # 200 with a truncated JSON body
    "stuck",  # the job never leaves the queue (sync providers: like timeout)
    "job_failed",  # the job fails: fal COMPLETED + error, Replicate/Runflow status failed
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
HTTP_FAULTS = frozenset({"server_error", "rate_limited", "out_of_credit", "timeout", "reset", "malformed"})
JOB_FAULTS = frozenset({"stuck", "job_failed"})


@dataclass
class Latency:
    """Delay added before every protocol response (the API's own latency).

    `fixed`: `ms`. `uniform`: between `low_ms` and `high_ms`. `lognormal`:
    `median_ms * exp(sigma * N(0, 1))`, capped at `max_ms` when that is > 0.
    """

    kind: LatencyKind = "fixed"
    ms: float = 0.0
    low_ms: float = 0.0
    high_ms: float = 0.0
    median_ms: float = 0.0
    sigma: float = 0.5
    max_ms: float = 0.0

    def sample_s(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            ms = self.ms
        elif self.kind == "uniform":
            ms = rng.uniform(self.low_ms, max(self.low_ms, self.high_ms))
        else:
            ms = self.median_ms * math.exp(self.sigma * rng.gauss(0.0, 1.0)) if self.median_ms > 0 else 0.0
        if self.max_ms > 0:
            ms = min(ms, self.max_ms)
        return max(0.0, ms) / 1000.0


@dataclass
class Faults:
    """Fault rates (probabilities per eligible request, summing to at most 1).

    `queue` lists faults to inject first, one per eligible request, in order:
    the deterministic way for a test to say "the next create answers 429".
    `scope`: `create` (default) injects only on calls that create paid work;
    `all` also on polls, results, cancels and free calls (admin and /files
    never). Job-level faults apply only to creates.
    """

    server_error: float = 0.0
    rate_limited: float = 0.0
    out_of_credit: float = 0.0
    timeout: float = 0.0
    reset: float = 0.0
    malformed: float = 0.0
    stuck: float = 0.0
    job_failed: float = 0.0
    server_error_status: int = 500
    retry_after_s: float = 1.0
    timeout_hold_s: float = 120.0  # released early when the client hangs up
    scope: Literal["create", "all"] = "create"
    queue: list[str] = field(default_factory=list)
    # job_failed's code: fal error_type, Runflow failure_code; None: the provider's default
    job_error_code: str | None = None

    def rates(self) -> list[tuple[str, float]]:
        return [(k, getattr(self, k)) for k in FAULT_KINDS if getattr(self, k) > 0]


@dataclass
class JobTiming:
    """How long a job spends in each phase.

    Async providers (fal, Replicate, Runflow) report the phase on each poll;
    sync providers (EmpirioLabs, local) hold the request for queue + run.
    `dispatch_ms` is Runflow's `dispatching` phase (ignored elsewhere).
    """

    queue_ms: float = 0.0
    dispatch_ms: float = 0.0
    run_ms: float = 0.0


@dataclass
class Trickle:
    """Send response bodies slowly: `chunk_bytes` at a time, the first at once,
    then one every `interval_ms` (`chunk_bytes` 0: off). It applies to every
    protocol response and to /files downloads (never to the admin API), so it
    slows whatever an adapter reads, whichever provider it speaks: a stream
    whose every read arrives well inside a per-read timeout, yet whose whole
    body takes far longer than any deadline."""

    chunk_bytes: int = 0
    interval_ms: float = 100.0


@dataclass
class LocalBackend:
    """Knobs of the local backend emulator only (local_backend/schemas.py)."""

    max_concurrency: int = 1  # generations running at once (the "GPU")
    queue_capacity: int = 32  # waiting beyond that answers 429 + Retry-After
    ready: bool = True  # False: /health/ready 503 and generations 503 (warming up)
    gpu_usd_per_hour: float = 2.5
    seconds_per_image: float = 0.57  # at 1 MP and 4 steps (docs/providers/local.md#price)
    utilisation: float = 0.6  # amortized cost = marginal / utilisation


@dataclass
class EmulatorKnobs:
    latency: Latency = field(default_factory=Latency)
    faults: Faults = field(default_factory=Faults)
    job: JobTiming = field(default_factory=JobTiming)
    nsfw_rate: float = 0.0  # share of images flagged by the (emulated) safety checker
    pad_to_bytes: int = 0  # pad every image file up to this size (e.g. 1_100_000 for ~1.5 MB b64)
    seed: int | None = None  # seeds the fault/latency/seed RNG, for reproducible runs
    cancel_spelling: Literal["canceled", "cancelled"] = "canceled"  # Runflow status_code
    local: LocalBackend = field(default_factory=LocalBackend)
    # Scales the cost an emulator reports billing (Runflow's run `cost`, the local
    # service's `cost_usd_estimate`): 1.1 bills 10% above the price sheet, for
    # reconciliation tests. Providers without a cost figure ignore it.
    billed_cost_factor: float = 1.0
    trickle: Trickle = field(default_factory=Trickle)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def merge(self, patch: dict[str, Any]) -> EmulatorKnobs:
        """A new EmulatorKnobs with `patch` merged in (nested dicts merge).

        Raises ValueError naming the first unknown or ill-typed field."""
        merged = _merge(self, patch, "")
        merged.validate()
        return merged

    def validate(self) -> None:
        f = self.faults
        total = sum(rate for _, rate in f.rates())
        for kind in FAULT_KINDS:
            if not 0.0 <= getattr(f, kind) <= 1.0:
                raise ValueError(f"faults.{kind} must be within 0..1")
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:.3f}, more than 1")
        for item in f.queue:
            if item not in FAULT_KINDS and item != "none":
                raise ValueError(f"faults.queue: unknown fault {item!r}; known: {', '.join(FAULT_KINDS)}, none")
        # (the knobs are out of bounds, what they are told), checked in this order
        out_of_bounds = [
            (not 500 <= f.server_error_status <= 599, "faults.server_error_status must be a 5xx status"),
            (not 0.0 <= self.nsfw_rate <= 1.0, "nsfw_rate must be within 0..1"),
            (self.latency.kind not in get_args(LatencyKind), f"latency.kind must be one of {get_args(LatencyKind)}"),
            (self.cancel_spelling not in ("canceled", "cancelled"), "cancel_spelling must be 'canceled' or 'cancelled'"),
            (f.scope not in ("create", "all"), "faults.scope must be 'create' or 'all'"),
            (self.local.max_concurrency < 1 or self.local.queue_capacity < 0, "local.max_concurrency must be >= 1 and local.queue_capacity >= 0"),
            (self.pad_to_bytes < 0, "pad_to_bytes must be >= 0"),
            (not 0.0 <= self.billed_cost_factor <= 100.0, "billed_cost_factor must be within 0..100"),
            (self.trickle.chunk_bytes < 0 or self.trickle.interval_ms < 0, "trickle.chunk_bytes and trickle.interval_ms must be >= 0"),
        ]
        for broken, message in out_of_bounds:
            if broken:
                raise ValueError(message)

    @classmethod
    def realistic(cls, provider: str) -> EmulatorKnobs:
        """Latencies in the range the references report, for demos.

        fal: Lumenfall saw p50 900 ms, p95 2.3 s end to end (https://lumenfall.ai/models/black-forest-labs/flux.2-klein-4b,
        30 days); the others are set alike, the local GPU faster."""
        timing = {
            "fal": JobTiming(queue_ms=150, run_ms=700),
            "replicate": JobTiming(queue_ms=300, run_ms=900),
            "runflow": JobTiming(queue_ms=200, dispatch_ms=100, run_ms=800),
            "empiriolabs": JobTiming(run_ms=1100),
            "local": JobTiming(run_ms=570),
        }.get(provider, JobTiming(run_ms=800))
        return cls(latency=Latency(kind="lognormal", median_ms=40, sigma=0.4, max_ms=400), job=timing)


def _merge(obj: Any, patch: Any, where: str) -> Any:
    if not isinstance(patch, dict):
        raise ValueError(f"{where or 'knobs'}: expected an object")
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in patch.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"unknown knob {path!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, path)
        else:
            changes[key] = _coerce(current, value, path, fields[key].type)
    return dataclasses.replace(obj, **changes)


def _coerce(current: Any, value: Any, path: str, annotation: Any) -> Any:
    """Check a leaf value against the type of the field it replaces."""
    if isinstance(current, bool) or annotation == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false")
        return value
    if isinstance(current, list):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list")
        return list(value)
    if value is None:
        if "None" in str(annotation):
            return None
        raise ValueError(f"{path}: may not be null")
    if isinstance(current, float) or annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number")
        return float(value)
    if isinstance(current, int) or "int" in str(annotation):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{path}: expected an integer")
        return int(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string")
        return value
    return value
