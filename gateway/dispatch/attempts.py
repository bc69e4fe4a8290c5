"""Run a plan: one adapter call per attempt, classified failures, failover.

The only code that waits on backends. Each failure is classified once
(docs/design.md#failure-classes) and decides three things: whether the next backend
may be tried, what it does to this backend's health, and what was spent.

- Every attempt is bounded by `asyncio.timeout_at`, whatever the adapter does
  with its deadline: a response that trickles in cannot run past it, and
  neither can fetching reference images (all at once, within the attempt).
- Anything an adapter raises is classified; an unexpected exception type is a
  failure of that backend and the next one is tried.
- "Submitted, outcome unknown": dispatch asks the provider to cancel and waits
  for the answer while the deadline allows. A confirmed cancel is not billed
  and the next backend is tried; so it is where the provider has no cancel
  (then the attempt is reported as possibly billed). A cancel refused or left
  unanswered means the job may still run and be billed: buying it again
  elsewhere would pay twice, so dispatch stops there (502 `outcome_unknown`).
- The request's deadline ends the wait, not the accounting: a job still
  pending when the request's deadline passes is asked to cancel (free for a
  job no runner started) and, where the provider can be followed
  (`Adapter.resumable`), handed back as `Unsettled` on the 504, so the caller
  of `run` learns its real end afterwards (gateway/dispatch/followup.py):
  cancelled unbilled, or billed, with or without its image. Elsewhere it stays
  counted as possibly billed.
- Money: `cost_usd` is what was surely billed (the `x-klein-cost-usd` header
  and klein_cost_usd_total); `possibly_billed_usd` is work of unknown outcome
  (the `x-klein-possibly-billed-usd` header, klein_possibly_billed_usd_total).
  Another attempt after a possibly billed or an undeliverable billed one is
  counted as possible double spend.
- The gateway's own overload is not a backend's failure: an attempt that could
  not reach its backend (UNREACHABLE: nothing was sent, nothing billed) while
  this process's event loop ran late by a good share of the connect timeout
  (gateway/dispatch/overload.py) is coded `gateway_overloaded`, does not count against
  the backend's health, and is tried again on the same backend (at most
  OVERLOAD_RETRIES times, within the deadline), not failed over.
- Nor is the caller's own short deadline: a timeout in an attempt given less
  than the backend's expected latency is coded `caller_deadline`
  (gateway/dispatch/blame.py) and does not count against its health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from gateway.dispatch.blame import expected_latency, judged
from gateway.dispatch.delivery import ResultShaper, ShapedImage, delivery_failed
from gateway.dispatch.fleet import Backend
from gateway.dispatch.overload import LoopLag
from gateway.dispatch.produced import bill_produced, failure_cost, produced_megapixels, produced_size, trusted_billed
from gateway.dispatch.progress import Progress, Unsettled
from gateway.dispatch.upload_links import UploadLinks
from gateway.domain.capabilities import eligible
from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob
from gateway.health.tracker import Admission, HealthTracker
from gateway.health.view import BreakerState, HealthView
from gateway.observability.metrics import GatewayMetrics
from gateway.providers._caller_text import caller_message_of
from gateway.providers.base import (
    GATEWAY_OVERLOADED,
    AdapterSettings,
    FailureClass,
    ProviderError,
    ProviderResult,
    Timeouts,
    submitted_jobs,
)
from gateway.redaction import redact
from gateway.routing.plan import Candidate, Plan, SkipCause

log = logging.getLogger(__name__)

SKIPPED = "skipped"
MIN_ATTEMPT_S = 5.0  # an attempt that is not the last gets at least this long...
FALLBACK_RESERVE = 0.3  # ...but never the share of the deadline kept for the next backend
LATENCY_HEADROOM = 1.25  # a healthy backend gets its p95 latency times this, where the deadline allows
HEALTHY_ERROR_RATE = 0.2  # below this a slow backend is slow, not sick
BACKSTOP_GRACE_S = 0.25  # the adapter's own deadline handling goes first; the hard bound right after
CANCEL_TIMEOUT_S = 2.0
DEADLINE_SLACK_S = 0.05  # timers may fire this early; an attempt cut that close ran into the deadline
OVERLOAD_LAG_SHARE = 0.2  # a loop this late (times the connect timeout) makes a failed connect the gateway's own doing
OVERLOAD_RETRIES = 6  # tries again on the same backend after failures that were the gateway's overload


def attempt_budget(remaining: float, last: bool, needs_s: float | None = None) -> float:
    """How long one attempt may take: half of what is left (at least MIN_ATTEMPT_S),
    always keeping FALLBACK_RESERVE of it for the backends after this one, so a
    hung cheapest backend cannot eat a short deadline whole. A backend whose
    recent latency says it needs longer (`needs_s`) gets that much when the
    deadline holds it: cutting a healthy slow backend short would only turn its
    job into an unknown outcome, paid for and then bought again elsewhere."""
    if last:
        return remaining
    budget = min(max(remaining * 0.5, min(remaining, MIN_ATTEMPT_S)), remaining * (1 - FALLBACK_RESERVE))
    if needs_s is not None and budget < needs_s <= remaining:
        return needs_s
    return budget


def needed_time(view: HealthView) -> float | None:
    """The time a healthy backend's recent answers say it needs; None when it
    is not healthy enough to be waited for (a hang must not buy itself time)."""
    if view.state is not BreakerState.CLOSED or view.error_rate >= HEALTHY_ERROR_RATE or view.latency_p95_s is None:
        return None
    return view.latency_p95_s * LATENCY_HEADROOM


@dataclass(slots=True)
class Attempt:
    backend: str
    outcome: str  # "success" or a FailureClass value
    latency_s: float
    cost_usd: Decimal = Decimal(0)
    status: int | None = None
    message: str = ""
    possibly_billed_usd: Decimal = Decimal(0)
    billed_usd: Decimal | None = None  # the provider's own figure, where its answer had one

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
    possibly_billed_usd: Decimal = Decimal(0)
    size: str | None = None  # what was produced ("WxH"); a flexible request may get a backend's native size
    megapixels: Decimal | None = None  # output megapixels of all the images, at the sizes produced

    @property
    def tried(self) -> int:
        return tried(self.attempts)

    @property
    def billed_usd(self) -> Decimal | None:
        """What the serving backend said it billed, where it said so."""
        return self.attempts[-1].billed_usd if self.attempts else None


class DispatchFailed(GatewayError):
    """Every attempt failed; carries what was spent and tried, for the headers."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        attempts: list[Attempt],
        cost_usd: Decimal,
        upstream_s: float,
        retryable: bool | None,
        type_: str = "server_error",
        retry_after: float | None = None,
        possibly_billed_usd: Decimal = Decimal(0),
        unsettled: tuple[Unsettled, ...] = (),
    ) -> None:
        super().__init__(message, status=status, code=code, retryable=retryable, retry_after=retry_after, details={"attempts": [a.summary() for a in attempts]})
        self.type = type_
        self.attempts = attempts
        self.cost_usd = cost_usd
        self.upstream_s = upstream_s
        self.possibly_billed_usd = possibly_billed_usd
        self.unsettled = unsettled  # provider jobs still running at the deadline: their outcome is followed up


@dataclass(slots=True)
class _Run:
    """What one request's dispatch has done so far."""

    job: ImageJob
    deadline: float
    attempts: list[Attempt] = field(default_factory=list)
    spent: Decimal = Decimal(0)
    possibly: Decimal = Decimal(0)
    upstream: float = 0.0
    billed_elsewhere: bool = False  # an earlier attempt may have bought an image nobody got
    retry_same: bool = False  # the last attempt failed for the gateway's overload; try its backend again
    keep_images_s: int | None = None  # stored images outlive the store's TTL (a job's or an idempotent answer's record)
    progress: Progress = field(default_factory=Progress)  # shared with the caller of Dispatcher.run
    unsettled: list[Unsettled] = field(default_factory=list)  # jobs left running at the deadline, to follow up

    def note_cancelled(self) -> None:
        """Hand what was spent to the caller's Progress: dispatch is ending without an answer."""
        self.progress.attempts = list(self.attempts)
        self.progress.spent, self.progress.possibly_billed, self.progress.upstream_s = self.spent, self.possibly, self.upstream


class _Stop(Exception):
    """Ends dispatch early with this error (a cancel the provider did not confirm)."""

    def __init__(self, error: DispatchFailed) -> None:
        self.error = error


def _monotonic_to_loop(instant: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (instant - time.monotonic())


def _unexpected(exc: Exception, backend: str, submitted: list[str]) -> ProviderError:
    """A classified failure for an exception an adapter should not have raised."""
    # The type only: messages of library errors can carry URLs and credentials.
    log.warning("backend %s raised %s; treated as a failed attempt", backend, type(exc).__name__)
    if submitted:
        return ProviderError(FailureClass.UNKNOWN_OUTCOME, f"the adapter failed after submitting: {type(exc).__name__}", job_id=submitted[-1], billed=True)
    return ProviderError(FailureClass.FAILED, f"the adapter failed: {type(exc).__name__}")


@dataclass
class Dispatcher:
    backends: dict[str, Backend]
    health: HealthTracker
    shaper: ResultShaper
    metrics: GatewayMetrics
    uploads: UploadLinks | None = None  # lends uploads a URL for backends that take URLs only
    lag: LoopLag = field(default_factory=LoopLag)  # how late this process's loop runs (gateway/dispatch/overload.py)
    _pending_cancels: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(
        self, job: ImageJob, plan: Plan, *, started: float, base_url: str, cover: Callable[[Decimal], Awaitable[None]] | None = None, keep_images_s: int | None = None, progress: Progress | None = None
    ) -> Outcome:
        """Try the plan's backends in order. `cover(total)`, when given, is awaited
        before an attempt that follows billed spend, with that spend plus the
        attempt's quote: it may refuse (a GatewayError), which ends the request
        with what was spent (a caller's budget, gateway/money/tab.py).
        `keep_images_s`: how long stored images must live (ResultShaper.shape).
        `progress`, when given, learns when the work is handed to a provider,
        and what was spent if dispatch is cancelled (gateway/dispatch/progress.py)."""
        self.lag.watch()
        run = _Run(job, started + job.deadline_s, keep_images_s=keep_images_s, progress=progress or Progress())
        candidates = list(plan.attempts)
        try:
            for index, cand in enumerate(candidates):
                for retry in range(OVERLOAD_RETRIES + 1):
                    if run.deadline - time.monotonic() <= DEADLINE_SLACK_S:
                        raise self._exhausted(job, plan, run)
                    if run.progress.stop_requested:  # its owner cancelled the job: no new spend
                        raise self._failed(run, status=499, code="job_canceled", message="the job was canceled by its owner", retryable=False, type_="invalid_request_error")
                    if run.spent and cover is not None:
                        try:
                            await cover(run.spent + (cand.quote.usd if cand.quote is not None else Decimal(0)))
                        except GatewayError as err:
                            raise self._failed(run, status=err.status, code=err.code or "refused", message=err.message, retryable=err.retryable, type_=err.type) from None
                    admission = await self.health.acquire(cand.name)
                    if admission is None:
                        run.attempts.append(Attempt(cand.name, SKIPPED, 0.0, message="circuit half-open, trial in progress"))
                        break
                    try:
                        outcome = await self._attempt(run, cand, admission, last=index == len(candidates) - 1, base_url=base_url, may_retry=retry < OVERLOAD_RETRIES)
                    finally:
                        if admission.lease is not None:  # a request cancelled half way never keeps its trial slot
                            await asyncio.shield(self.health.release(admission))
                    if outcome is not None:
                        return outcome
                    if not run.retry_same:
                        break
                    run.retry_same = False
        except _Stop as stop:
            raise stop.error from None
        except asyncio.CancelledError:
            run.note_cancelled()  # the spend made before the cancel is still owed
            raise
        raise self._exhausted(job, plan, run)

    async def _attempt(self, run: _Run, cand: Candidate, admission: Admission, *, last: bool, base_url: str, may_retry: bool = False) -> Outcome | None:
        """One attempt: its Outcome, or None after recording its failure
        (with `run.retry_same` set where `may_retry` and the gateway's overload caused it)."""
        job, backend = cand.served(run.job), self.backends[cand.name]  # at the size this backend produces (gateway.domain.native_sizes)
        t0 = time.monotonic()
        attempt_deadline = t0 + attempt_budget(run.deadline - t0, last, needed_time(cand.health))
        if run.billed_elsewhere:
            self.metrics.record_double_spend(backend=cand.name)
        submitted: list[str] = []
        token = submitted_jobs.set(submitted)
        result: ProviderResult | None = None
        waited: float | None = None  # time spent in the adapter, i.e. on the provider
        try:
            try:
                job_for = await self._prepare(backend, job, attempt_deadline)
            except GatewayError as err:  # the job cannot be prepared for this backend (e.g. a reference URL)
                elapsed = time.monotonic() - t0
                run.attempts.append(Attempt(cand.name, FailureClass.REJECTED.value, elapsed, status=err.status, message=err.message))
                self.metrics.observe_attempt(backend=cand.name, outcome=FailureClass.REJECTED.value, latency_s=elapsed)
                if not last:
                    self.metrics.record_failover(from_backend=cand.name, reason=FailureClass.REJECTED.value)
                return None
            try:
                run.progress.handed_over = True  # from here on the attempt may bill
                result = await self._generate(backend, job_for, attempt_deadline, run.deadline, submitted)
                waited = time.monotonic() - t0
                run.upstream += waited
                images = await self.deliver(job, result, cand.name, run.deadline, base_url, run.keep_images_s)
            except ProviderError as err:
                elapsed = time.monotonic() - t0
                if waited is None:
                    run.upstream += elapsed
                ran_out = time.monotonic() >= attempt_deadline - DEADLINE_SLACK_S  # a timeout: the caller's deadline or the backend's (gateway/dispatch/blame.py)
                err = judged(self._overload_or(err, backend, t0), given_s=attempt_deadline - t0, ran_out=ran_out, expected_s=expected_latency(cand.health))
                await self._failed_attempt(run, cand, backend, admission, err, elapsed, result, submitted, last=last, may_retry=may_retry)
                return None
        except asyncio.CancelledError:
            # The server is stopping past its grace (a caller who leaves after the
            # hand-over no longer cancels): cancel what this attempt submitted,
            # so nobody pays for an image no one will see.
            for job_id in submitted:
                self._cancel_later(backend, job_id)
            if submitted:  # it may have started before the cancel reaches it: at stake, not lost
                at_stake = backend.bill(job, job.n, cand.health)
                run.possibly += at_stake
                self.metrics.record_possibly_billed(backend=cand.name, usd=at_stake)
            raise
        finally:
            submitted_jobs.reset(token)
        elapsed = time.monotonic() - t0
        # The gateway's figure is always the price sheet's; a provider's own
        # figure, where it is a sane amount, travels beside it for
        # reconciliation (gateway/money/reconcile.py).
        cost = bill_produced(backend, job, images, cand.health)  # at the sizes made, which a shape request may vary
        billed = trusted_billed(result.reported_cost_usd, cost)
        run.spent += cost
        run.attempts.append(Attempt(cand.name, "success", elapsed, cost, billed_usd=billed))
        self.metrics.observe_attempt(backend=cand.name, outcome="success", latency_s=elapsed)
        megapixels = produced_megapixels(job, images)
        self.metrics.record_spend(backend=cand.name, caller=job.caller, usd=cost, megapixels=megapixels, images=len(images), baseline_usd=self.baseline_usd(run.job, backend))
        await self.health.record_success(cand.name, elapsed, admission)  # after the spend is counted: a cancel here loses none of it
        return Outcome(cand.name, images, run.attempts, run.spent, run.upstream, result.seed, run.possibly, size=produced_size(job, images), megapixels=megapixels)

    # ---- the three phases of an attempt, each bounded --------------------------

    async def _prepare(self, backend: Backend, job: ImageJob, attempt_deadline: float) -> ImageJob:
        if not job.references:
            return job  # Backend.prepare has nothing to lend or fetch: spare the timer
        try:
            async with asyncio.timeout_at(_monotonic_to_loop(attempt_deadline)):
                return await backend.prepare(job, self.uploads, deadline=attempt_deadline)
        except GatewayError:
            raise
        except TimeoutError:
            raise GatewayError("reference images could not be fetched within the request's deadline", param="images", code="invalid_image_url", status=422) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a URL the HTTP client cannot parse
            raise GatewayError(f"reference images could not be prepared for this backend ({type(exc).__name__})", param="images", code="invalid_image_url", status=422) from None

    async def _generate(self, backend: Backend, job: ImageJob, attempt_deadline: float, deadline: float, submitted: list[str]) -> ProviderResult:
        hard = min(attempt_deadline + BACKSTOP_GRACE_S, deadline)
        try:
            async with asyncio.timeout_at(_monotonic_to_loop(hard)):
                return await backend.adapter.generate(job, attempt_deadline)
        except ProviderError:
            raise
        except TimeoutError:
            job_id = submitted[-1] if submitted else None
            raise ProviderError(FailureClass.UNKNOWN_OUTCOME, "the attempt ran out of time while the provider was still answering", job_id=job_id, billed=True) from None
        except Exception as exc:  # noqa: BLE001 - never let one adapter end the request
            raise _unexpected(exc, backend.name, submitted) from None

    async def deliver(self, job: ImageJob, result: ProviderResult, backend: str, deadline: float, base_url: str, keep_s: int | None = None) -> list[ShapedImage]:
        """The provider's images shaped as the caller asked, within `deadline`; failures are DELIVERY_FAILED."""
        try:
            async with asyncio.timeout_at(_monotonic_to_loop(deadline)):
                return await self.shaper.shape(job, result.images, backend=backend, deadline=deadline, base_url=base_url, keep_s=keep_s)
        except ProviderError:
            raise
        except TimeoutError:
            raise delivery_failed("deadline passed while delivering the images", network=True) from None
        except Exception as exc:  # noqa: BLE001
            log.warning("delivering %s's images raised %s", backend, type(exc).__name__)
            raise delivery_failed(f"the images could not be delivered: {type(exc).__name__}") from None

    # ---- failures and money ----------------------------------------------------

    def _overload_or(self, err: ProviderError, backend: Backend, started: float) -> ProviderError:
        """`err`, coded `gateway_overloaded` when the backend could not be reached
        while this process's loop ran late by OVERLOAD_LAG_SHARE of the connect
        timeout or more: a connect needs a few turns of the loop, and when each
        takes seconds the timer fires before the loop has seen the socket connect."""
        if err.failure is not FailureClass.UNREACHABLE or err.code == GATEWAY_OVERLOADED:
            return err
        settings = getattr(backend.adapter, "settings", None)  # a test's stand-in adapter may have none
        connect_s = settings.timeouts.connect if isinstance(settings, AdapterSettings) else Timeouts().connect
        if self.lag.worst_since(started) < OVERLOAD_LAG_SHARE * connect_s:
            return err
        return replace(err, code=GATEWAY_OVERLOADED)

    async def _failed_attempt(
        self, run: _Run, cand: Candidate, backend: Backend, admission: Admission, err: ProviderError,
        elapsed: float, result: ProviderResult | None, submitted: list[str], *, last: bool, may_retry: bool = False,
    ) -> None:  # fmt: skip
        job = cand.served(run.job)  # billed at the size it was asked to make
        cost = possibly = Decimal(0)
        refused_cancel = False
        followed = False
        if err.failure is FailureClass.UNKNOWN_OUTCOME:
            job_ids = [j for j in (err.job_id or "").split(",") if j] or list(submitted)
            settled, cancel = await self._cancel_and_wait(backend, job_ids, run.deadline)
            if settled is not True:  # not confirmed unbilled: it may be billed
                possibly = backend.bill(job, job.n, cand.health)
                run.billed_elsewhere = True
                refused_cancel = settled is False
                if job_ids and backend.adapter.resumable and time.monotonic() >= run.deadline - DEADLINE_SLACK_S:
                    # The request's deadline ended the wait: the job's own end (cancelled
                    # unbilled, or billed, with or without its image) is learnt afterwards.
                    followed = True
                    run.unsettled.append(Unsettled(cand.name, job, tuple(job_ids), possibly, cancel))
        else:
            cost = failure_cost(backend, job, err, result, cand.health)
            if err.failure is FailureClass.DELIVERY_FAILED:  # an image bought that nobody got
                run.billed_elsewhere = True
        run.spent += cost
        run.possibly += possibly
        log.info("%s attempt %s: %s", cand.name, err.failure.value, redact(err.message))  # the provider's words, for the operator only
        run.attempts.append(Attempt(cand.name, err.failure.value, elapsed, cost, err.status, caller_message_of(cand.name, err), possibly))
        self.metrics.observe_attempt(backend=cand.name, outcome=err.failure.value, latency_s=elapsed)
        if cost:
            self.metrics.record_spend(backend=cand.name, caller=job.caller, usd=cost, megapixels=Decimal(0), images=0, baseline_usd=Decimal(0))
        if possibly and not followed:  # a followed job's real outcome is counted when it is learnt
            self.metrics.record_possibly_billed(backend=cand.name, usd=possibly)
        await self.health.record_failure(cand.name, err, elapsed, admission)
        # Nothing reached the backend and it is not to blame: the same backend again, not the next one.
        run.retry_same = may_retry and err.failure is FailureClass.UNREACHABLE and err.code == GATEWAY_OVERLOADED
        if err.failure is FailureClass.CONTENT_FILTERED:
            raise _Stop(self._failed(run, status=400, code="content_policy_violation", message="the image was flagged by the safety checker", retryable=False, type_="invalid_request_error"))
        if refused_cancel:
            raise _Stop(
                self._failed(
                    run,
                    status=502,
                    code="outcome_unknown",
                    message=f"{cand.name} did not confirm cancelling a job whose outcome is unknown; it may still run and be billed, so it was not bought again elsewhere",
                    retryable=False,  # a blind retry may pay a second time; the Idempotency-Key replays this answer
                )
            )
        if not last and not run.retry_same:
            self.metrics.record_failover(from_backend=cand.name, reason=err.failure.value)

    async def _cancel_and_wait(self, backend: Backend, job_ids: list[str], deadline: float) -> tuple[bool | None, asyncio.Task[bool | None] | None]:
        """True: every job's cancel confirmed. False: refused, or not answered
        within CANCEL_TIMEOUT_S. None: nothing to cancel, no cancel at this
        provider, or the request's deadline came first (the request ends
        anyway; the cancels carry on in the background). With it, the cancel's
        task, whose answer a follow-up of the job reads."""
        if not job_ids:
            return None, None
        task = asyncio.get_running_loop().create_task(self._cancel_all(backend, job_ids))
        self._pending_cancels.add(task)
        task.add_done_callback(self._pending_cancels.discard)
        wait_s = min(CANCEL_TIMEOUT_S, deadline - time.monotonic())
        if wait_s > 0:
            await asyncio.wait([task], timeout=wait_s)
        if not task.done():
            return (False if wait_s >= CANCEL_TIMEOUT_S else None), task
        if task.cancelled() or task.exception() is not None:
            return False, task
        return task.result(), task

    @staticmethod
    async def _cancel_all(backend: Backend, job_ids: list[str]) -> bool | None:
        async def one(job_id: str) -> bool | None:
            try:
                return await asyncio.wait_for(backend.adapter.cancel(job_id), CANCEL_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - an unanswered cancel is not a confirmed one
                return False

        answers = await asyncio.gather(*(one(j) for j in job_ids))
        if all(a is None for a in answers):
            return None
        return all(a is True for a in answers)

    def baseline_usd(self, job: ImageJob, served_by: Backend) -> Decimal | None:
        """The baseline's price for this job, or None where the baseline backend
        could not have served it (then there is nothing to compare with)."""
        baseline = self.backends.get(self.metrics.baseline_backend or "")
        if baseline is not None and not eligible(job, baseline.capabilities_for(job)):
            return None
        return served_by.baseline_quote(job)

    def _cancel_later(self, backend: Backend, job_id: str) -> None:
        async def cancel() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(backend.adapter.cancel(job_id), CANCEL_TIMEOUT_S)

        task = asyncio.get_running_loop().create_task(cancel())
        self._pending_cancels.add(task)
        task.add_done_callback(self._pending_cancels.discard)

    # ---- the answer when nothing delivered -------------------------------------

    def _exhausted(self, job: ImageJob, plan: Plan, run: _Run) -> DispatchFailed:
        tried = [a for a in run.attempts if a.outcome != SKIPPED]
        if time.monotonic() >= run.deadline - DEADLINE_SLACK_S:
            return self._failed(run, status=504, code="deadline_exceeded", message=f"no backend answered within the {job.deadline_s:g}s deadline", retryable=True)
        if not tried:
            return self._failed(run, status=503, code="no_backend_available", message="no backend was available for this request", retryable=True, retry_after=1.0)
        others_down = any(skip.cause is SkipCause.UNAVAILABLE for skip in plan.details)
        if all(a.outcome == FailureClass.REJECTED.value for a in tried) and not others_down:
            first = tried[0]
            return self._failed(
                run, status=422, code="rejected_by_backends", message=f"every backend rejected the request; {first.backend}: {first.message}", retryable=False, type_="invalid_request_error"
            )
        summary = "; ".join(f"{a.backend}: {a.outcome}" for a in tried)
        return self._failed(run, status=502, code="all_backends_failed", message=f"every eligible backend failed ({summary})", retryable=True)

    @staticmethod
    def _failed(run: _Run, *, status: int, code: str, message: str, retryable: bool | None, type_: str = "server_error", retry_after: float | None = None) -> DispatchFailed:
        return DispatchFailed(
            message,
            status=status,
            code=code,
            attempts=run.attempts,
            cost_usd=run.spent,
            upstream_s=run.upstream,
            retryable=retryable,
            type_=type_,
            retry_after=retry_after,
            possibly_billed_usd=run.possibly,
            unsettled=tuple(run.unsettled),
        )

    async def drain(self) -> None:
        """Let pending cancels and health writes finish (on shutdown)."""
        await self.lag.stop()
        if self._pending_cancels:
            await asyncio.gather(*self._pending_cancels, return_exceptions=True)
