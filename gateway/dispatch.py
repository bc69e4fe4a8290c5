"""Run a plan: one adapter call per attempt, classified failures, failover.

The only code that waits on backends. Each failure is classified once
(docs/design.md#failure-classes) and decides three things: whether the next backend
may be tried, what it does to this backend's health, and what was spent.
Work that may already be billed (a submitted job whose outcome is unknown) is
cancelled where the provider allows it, and resubmitting it elsewhere is
counted as possible double spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.backends import Backend
from gateway.errors import GatewayError
from gateway.health import HealthTracker
from gateway.job import ImageJob
from gateway.metrics import GatewayMetrics
from gateway.pricing import usd
from gateway.providers.base import FailureClass, ProviderError, submitted_jobs
from gateway.results import ResultShaper, ShapedImage
from gateway.routing import Plan, SkipCause
from gateway.upload_links import UploadLinks

SKIPPED = "skipped"
MIN_ATTEMPT_S = 5.0  # an attempt that is not the last gets at least this long...
FALLBACK_RESERVE = 0.3  # ...but never the share of the deadline kept for the next backend


def attempt_budget(remaining: float, last: bool) -> float:
    """How long one attempt may take: half of what is left (at least MIN_ATTEMPT_S),
    always keeping FALLBACK_RESERVE of it for the backends after this one, so a
    hung cheapest backend cannot eat a short deadline whole."""
    if last:
        return remaining
    return min(max(remaining * 0.5, min(remaining, MIN_ATTEMPT_S)), remaining * (1 - FALLBACK_RESERVE))
CANCEL_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Attempt:
    backend: str
    outcome: str  # "success" or a FailureClass value
    latency_s: float
    cost_usd: Decimal = Decimal(0)
    status: int | None = None
    message: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, "outcome": self.outcome, "latency_ms": round(self.latency_s * 1000)}
        if self.status is not None:
            out["status"] = self.status
        if self.message:
            out["message"] = self.message
        return out


def tried(attempts: list[Attempt]) -> int:
    """Attempts that reached an adapter (a backend skipped at its half-open gate was not tried)."""
    return sum(1 for a in attempts if a.outcome != SKIPPED)


@dataclass(slots=True)
class Outcome:
    backend: str
    images: list[ShapedImage]
    attempts: list[Attempt]
    cost_usd: Decimal
    upstream_s: float
    seed: int | None = None
    size: str | None = None  # what was produced ("WxH"); a flexible request may get a backend's native size

    @property
    def tried(self) -> int:
        return tried(self.attempts)


class DispatchFailed(GatewayError):
    """Every attempt failed; carries what was spent and tried, for the headers."""

    def __init__(self, message: str, *, status: int, code: str, attempts: list[Attempt], cost_usd: Decimal, upstream_s: float, retryable: bool | None, type_: str = "server_error", retry_after: float | None = None) -> None:
        super().__init__(message, status=status, code=code, retryable=retryable, retry_after=retry_after, details={"attempts": [a.summary() for a in attempts]})
        self.type = type_
        self.attempts = attempts
        self.cost_usd = cost_usd
        self.upstream_s = upstream_s


@dataclass
class Dispatcher:
    backends: dict[str, Backend]
    health: HealthTracker
    shaper: ResultShaper
    metrics: GatewayMetrics
    uploads: UploadLinks | None = None  # lends uploads a URL for backends that take URLs only
    _pending_cancels: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(self, job: ImageJob, plan: Plan, *, started: float, base_url: str) -> Outcome:
        deadline = started + job.deadline_s
        attempts: list[Attempt] = []
        spent = Decimal(0)
        upstream = 0.0
        maybe_billed_elsewhere = False
        candidates = list(plan.attempts)
        for index, cand in enumerate(candidates):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            backend = self.backends[cand.name]
            served = cand.served(job)  # at the size this backend produces (gateway.native_sizes)
            if not await self.health.acquire(cand.name):
                attempts.append(Attempt(cand.name, SKIPPED, 0.0, message="circuit half-open, trial in progress"))
                continue
            last = index == len(candidates) - 1
            budget = attempt_budget(remaining, last)
            if maybe_billed_elsewhere:
                self.metrics.record_double_spend(backend=cand.name)
            t0 = time.monotonic()
            submitted: list[str] = []
            token = submitted_jobs.set(submitted)
            waited: float | None = None  # time spent in the adapter, i.e. on the provider
            try:
                job_for = await backend.prepare(served, self.uploads)
                result = await backend.adapter.generate(job_for, t0 + budget)
                waited = time.monotonic() - t0
                upstream += waited
                images = await self.shaper.shape(served, result.images, backend=cand.name, deadline=deadline, base_url=base_url)
            except ProviderError as err:
                elapsed = time.monotonic() - t0
                if waited is None:
                    upstream += elapsed
                cost = backend.bill(served, job.n, cand.health) if err.billed else Decimal(0)
                spent += cost
                attempts.append(Attempt(cand.name, err.failure.value, elapsed, cost, err.status, err.message))
                await self._record_failure(backend, job, err, elapsed, cost)
                if err.failure is FailureClass.CONTENT_FILTERED:
                    raise self._failed(attempts, spent, upstream, status=400, code="content_policy_violation", message="the image was flagged by the safety checker", retryable=False, type_="invalid_request_error") from None
                if err.failure is FailureClass.UNKNOWN_OUTCOME:
                    maybe_billed_elsewhere = True
                    if err.job_id:
                        self._cancel_later(backend, err.job_id)
                if not last:
                    self.metrics.record_failover(from_backend=cand.name, reason=err.failure.value)
                continue
            except GatewayError as err:  # the job cannot be prepared for this backend (e.g. a reference URL)
                elapsed = time.monotonic() - t0
                attempts.append(Attempt(cand.name, FailureClass.REJECTED.value, elapsed, status=err.status, message=err.message))
                self.metrics.observe_attempt(backend=cand.name, outcome=FailureClass.REJECTED.value, latency_s=elapsed)
                if not last:
                    self.metrics.record_failover(from_backend=cand.name, reason=FailureClass.REJECTED.value)
                await self.health.release(cand.name)
                continue
            except asyncio.CancelledError:
                # The caller went away (or the server is stopping): cancel what this
                # attempt submitted, so nobody pays for an image no one will see.
                for job_id in submitted:
                    self._cancel_later(backend, job_id)
                await asyncio.shield(self.health.release(cand.name))
                raise
            finally:
                submitted_jobs.reset(token)
            elapsed = time.monotonic() - t0
            cost = usd(result.reported_cost_usd) if result.reported_cost_usd is not None else backend.bill(served, len(images), cand.health)
            spent += cost
            attempts.append(Attempt(cand.name, "success", elapsed, cost))
            await self.health.record_success(cand.name, elapsed)
            self.metrics.observe_attempt(backend=cand.name, outcome="success", latency_s=elapsed)
            self.metrics.record_spend(backend=cand.name, caller=job.caller, usd=cost, megapixels=served.megapixels * len(images), images=len(images), baseline_usd=backend.baseline_quote(job))
            return Outcome(cand.name, images, attempts, spent, upstream, result.seed, served.size)
        raise self._exhausted(job, plan, attempts, spent, upstream, deadline)

    async def _record_failure(self, backend: Backend, job: ImageJob, err: ProviderError, elapsed: float, cost: Decimal) -> None:
        self.metrics.observe_attempt(backend=backend.name, outcome=err.failure.value, latency_s=elapsed)
        if cost:
            self.metrics.record_spend(backend=backend.name, caller=job.caller, usd=cost, megapixels=Decimal(0), images=0, baseline_usd=Decimal(0))
        await self.health.record_failure(backend.name, err, elapsed)

    def _cancel_later(self, backend: Backend, job_id: str) -> None:
        async def cancel() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(backend.adapter.cancel(job_id), CANCEL_TIMEOUT_S)

        task = asyncio.get_running_loop().create_task(cancel())
        self._pending_cancels.add(task)
        task.add_done_callback(self._pending_cancels.discard)

    def _exhausted(self, job: ImageJob, plan: Plan, attempts: list[Attempt], spent: Decimal, upstream: float, deadline: float) -> DispatchFailed:
        tried = [a for a in attempts if a.outcome != SKIPPED]
        if time.monotonic() >= deadline:
            return self._failed(attempts, spent, upstream, status=504, code="deadline_exceeded", message=f"no backend answered within the {job.deadline_s:g}s deadline", retryable=True)
        if not tried:
            return self._failed(attempts, spent, upstream, status=503, code="no_backend_available", message="no backend was available for this request", retryable=True, retry_after=1.0)
        others_down = any(skip.cause is SkipCause.UNAVAILABLE for skip in plan.details)
        if all(a.outcome == FailureClass.REJECTED.value for a in tried) and not others_down:
            first = tried[0]
            return self._failed(attempts, spent, upstream, status=422, code="rejected_by_backends", message=f"every backend rejected the request; {first.backend}: {first.message}", retryable=False, type_="invalid_request_error")
        summary = "; ".join(f"{a.backend}: {a.outcome}" for a in tried)
        return self._failed(attempts, spent, upstream, status=502, code="all_backends_failed", message=f"every eligible backend failed ({summary})", retryable=True)

    @staticmethod
    def _failed(attempts: list[Attempt], spent: Decimal, upstream: float, *, status: int, code: str, message: str, retryable: bool | None, type_: str = "server_error", retry_after: float | None = None) -> DispatchFailed:
        return DispatchFailed(message, status=status, code=code, attempts=attempts, cost_usd=spent, upstream_s=upstream, retryable=retryable, type_=type_, retry_after=retry_after)

    async def drain(self) -> None:
        """Let pending cancels and health writes finish (on shutdown)."""
        if self._pending_cancels:
            await asyncio.gather(*self._pending_cancels, return_exceptions=True)
