"""Learn the real outcome of a provider job nobody is waiting for any more.

Two kinds of work end that way: a job the request's deadline left running
(dispatch hands it back as `Unsettled` on its 504), and a job an async job's
earlier run submitted before its replica died. Both are followed with the
adapter's `resume` to the provider's own end, and counted by the same rule as
an attempt (gateway/dispatch/attempts.py): a success is billed at the sizes
produced, a failure as its class says, a job still unknown at the end of the
follow-up as possibly billed. Metrics are counted here; the budget, the ledger
and an Idempotency-Key's stored answer are the caller's to settle with the
figures returned. Health is left alone: the caller's deadline, not the
backend, cut the wait short.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal

from gateway.dispatch.attempts import Attempt, Dispatcher, DispatchFailed, Outcome
from gateway.dispatch.delivery import ShapedImage
from gateway.dispatch.produced import bill_produced, failure_cost, produced_megapixels, produced_size, trusted_billed
from gateway.dispatch.progress import Unsettled
from gateway.providers._caller_text import caller_message_of
from gateway.providers.base import FailureClass, ProviderError
from gateway.redaction import redact

log = logging.getLogger(__name__)

FOLLOW_UP_S = 600.0  # how long a followed job may still take: the longest deadline a request may have
CANCEL_ANSWER_S = 5.0  # how long the cancel sent at the deadline may take to answer
CANCELLED = "cancelled"  # the attempt's outcome when its cancel was confirmed: never ran, never billed


async def _confirmed(cancel: asyncio.Task[bool | None]) -> bool:
    """Whether the provider confirmed the cancel sent at the deadline (its job never ran)."""
    try:
        return await asyncio.wait_for(asyncio.shield(cancel), CANCEL_ANSWER_S) is True
    except Exception:  # noqa: BLE001 - unanswered or failed: not confirmed, so the job is followed
        return False


@dataclass(slots=True)
class Followed:
    """What a followed provider job came to."""

    backend: str
    attempt: Attempt
    cost_usd: Decimal = Decimal(0)
    possibly_billed_usd: Decimal = Decimal(0)  # still unknown when the follow-up gave up
    images: list[ShapedImage] = field(default_factory=list)  # delivered as the caller asked; empty unless it succeeded
    seed: int | None = None
    size: str | None = None
    megapixels: Decimal | None = None

    @property
    def succeeded(self) -> bool:
        return bool(self.images)

    @property
    def billed_usd(self) -> Decimal | None:
        return self.attempt.billed_usd


async def follow(dispatcher: Dispatcher, unsettled: Unsettled, *, base_url: str, keep_images_s: int | None, deadline: float | None = None) -> Followed:
    """Follow one provider job to its end (or `deadline`, by default FOLLOW_UP_S from now)."""
    name, job = unsettled.backend, unsettled.job
    backend = dispatcher.backends[name]
    metrics = dispatcher.metrics
    until = deadline if deadline is not None else time.monotonic() + FOLLOW_UP_S
    t0 = time.monotonic()
    if unsettled.cancel is not None and await _confirmed(unsettled.cancel):
        log.info("%s follow-up: the job was cancelled before it ran; not billed", name)
        return Followed(name, Attempt(name, CANCELLED, time.monotonic() - t0))
    result = None
    try:
        result = await backend.adapter.resume(job, list(unsettled.job_ids), until)
        images = await dispatcher.deliver(job, result, name, until, base_url, keep_images_s)
    except ProviderError as err:
        elapsed = time.monotonic() - t0
        cost = failure_cost(backend, job, err, result)  # the rule an attempt's failure is billed by
        possibly = unsettled.possibly_usd if err.failure is FailureClass.UNKNOWN_OUTCOME else Decimal(0)
        log.info("%s follow-up %s: %s", name, err.failure.value, redact(err.message))  # the provider's words, for the operator only
        metrics.observe_attempt(backend=name, outcome=err.failure.value, latency_s=elapsed)
        if cost:
            metrics.record_spend(backend=name, caller=job.caller, usd=cost, megapixels=Decimal(0), images=0, baseline_usd=Decimal(0))
        if possibly:
            metrics.record_possibly_billed(backend=name, usd=possibly)
        attempt = Attempt(name, err.failure.value, elapsed, cost, err.status, caller_message_of(name, err), possibly)
        return Followed(name, attempt, cost, possibly)
    elapsed = time.monotonic() - t0
    cost = bill_produced(backend, job, images)
    billed = trusted_billed(result.reported_cost_usd, cost)
    megapixels = produced_megapixels(job, images)
    metrics.observe_attempt(backend=name, outcome="success", latency_s=elapsed)
    metrics.record_spend(backend=name, caller=job.caller, usd=cost, megapixels=megapixels, images=len(images), baseline_usd=dispatcher.baseline_usd(job, backend))
    attempt = Attempt(name, "success", elapsed, cost, billed_usd=billed)
    return Followed(name, attempt, cost, images=images, seed=result.seed, size=produced_size(job, images), megapixels=megapixels)


def settled_attempts(err: DispatchFailed, followed: list[Followed]) -> list[Attempt]:
    """The request's attempts with each followed one's real end in place of its
    `unknown_outcome` (it is the same provider job, not another attempt)."""
    attempts = list(err.attempts)
    for f in followed:
        for i in range(len(attempts) - 1, -1, -1):
            a = attempts[i]
            if a.backend == f.backend and a.outcome == FailureClass.UNKNOWN_OUTCOME.value:
                attempts[i] = replace(f.attempt, latency_s=a.latency_s + f.attempt.latency_s)
                break
    won = next((i for i, a in enumerate(attempts) if a.outcome == "success"), None)
    if won is not None:
        attempts.append(attempts.pop(won))  # the serving attempt last, as dispatch orders them
    return attempts


def spent(err: DispatchFailed, followed: list[Followed]) -> tuple[Decimal, Decimal]:
    """(surely billed, possibly billed) of a request whose attempts ended in `err` and
    whose unsettled jobs came to `followed`: the attempts' spend plus what the jobs cost,
    and what is still unknown of those followed."""
    return err.cost_usd + sum((f.cost_usd for f in followed), Decimal(0)), sum((f.possibly_billed_usd for f in followed), Decimal(0))


def outcome_of(err: DispatchFailed, followed: list[Followed]) -> Outcome | None:
    """The request's outcome as if it had waited: the followed job that succeeded, with every attempt's spend."""
    won = next((f for f in followed if f.succeeded), None)
    if won is None:
        return None
    cost, possibly = spent(err, followed)
    return Outcome(won.backend, won.images, settled_attempts(err, followed), cost, err.upstream_s, won.seed, possibly, size=won.size, megapixels=won.megapixels)
