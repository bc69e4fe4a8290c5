"""Routing: which backends to try for one job, and in which order. Pure policy.

The one place where routing policy lives (docs/design.md#the-flow-of-a-request). Given each
backend's eligibility, quote and health snapshot, `plan()` drops those that
cannot or may not take the job, each with a reason, and orders the rest:
caller's `provider.order` first, then cheapest quote, then lowest recent
latency, then name (so plans are deterministic). It never raises for "nothing
left": `refusal()` turns an empty plan into the error the caller should see.

Choices where the contract is silent:
- A pinned backend (`fal/flux-2-klein-4b`) overrides `provider.only`/`ignore`
  and `order`; eligibility, health and `max_price` still apply.
- `provider.max_price` caps the quoted USD for the whole request (all n
  images). A backend without a quote cannot be shown to fit the cap, so it is
  skipped when a cap is set, and sorts after priced backends when not.
- A backend whose expected latency exceeds `job.deadline_s` is skipped
  (`SkipCause.TOO_SLOW`): submitting there would buy a job the caller cannot
  wait for. Expected latency is the health view's p50: recent answers, else
  the backend's `expected_latency_s` prior from providers.yaml (the fleet
  puts it there), else unknown, which never drops a backend. When that
  leaves nothing and nothing else is in the way, the refusal is 400
  `deadline_too_short`, before any spend.
- The queue check applies to backends that report a queue wait (the local
  GPU): wait plus recent p50 latency must fit `job.deadline_s`, so a busy
  local GPU spills to hosted backends. Dispatch enforces the deadline itself.
- Backend names are compared case-insensitively.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from gateway.domain.capabilities import Eligibility
from gateway.domain.errors import GatewayError, InvalidRequest, Unprocessable, UpstreamFailed
from gateway.domain.job import ImageJob
from gateway.health.view import HealthView
from gateway.routing.pricing import Quote

DEADLINE_PARAM = "x-klein-deadline-ms"  # where the caller sets `job.deadline_s`


@dataclass(frozen=True)
class Candidate:
    name: str
    eligibility: Eligibility
    quote: Quote | None
    health: HealthView
    job: ImageJob | None = None  # the job at the size this backend would produce; None: as asked

    def served(self, asked: ImageJob) -> ImageJob:
        return self.job if self.job is not None else asked


class SkipCause(StrEnum):
    PREFERENCE = "preference"  # pin, provider.only, provider.ignore
    INELIGIBLE = "ineligible"  # the backend cannot do exactly this job
    OVER_PRICE = "over_price"  # above provider.max_price, or no price to check
    UNAVAILABLE = "unavailable"  # breaker open, parked by Retry-After, bad credentials
    DEADLINE = "deadline"  # queue wait would blow the deadline
    TOO_SLOW = "too_slow"  # its expected latency alone exceeds the deadline
    NO_FALLBACK = "no_fallback"  # would have been a fallback; allow_fallbacks is false


@dataclass(frozen=True)
class Skip:
    """Why one backend is not in the plan, with what `refusal()` needs."""

    backend: str
    reason: str
    cause: SkipCause
    param: str | None = None
    usd: Decimal | None = None
    max_price: Decimal | None = None
    retry_after_s: float | None = None
    expected_s: float | None = None  # TOO_SLOW: the backend's expected latency


@dataclass(frozen=True)
class Plan:
    attempts: tuple[Candidate, ...]  # in order; attempts[0] is the chosen one
    details: tuple[Skip, ...] = ()  # every candidate not in attempts, and why

    @property
    def chosen(self) -> Candidate | None:
        return self.attempts[0] if self.attempts else None

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        """(backend, reason) for every skip, for listings and headers."""
        return tuple((s.backend, s.reason) for s in self.details)


def plan(job: ImageJob, candidates: Sequence[Candidate]) -> Plan:
    """Order the backends to try for `job`; see the module docstring for the policy."""
    survivors: list[Candidate] = []
    skips: list[Skip] = []
    for cand in candidates:
        skip = _why_skip(job, cand)
        if skip is None:
            survivors.append(cand)
        else:
            skips.append(skip)
    ordered = _order(job, survivors)
    if not job.prefs.allow_fallbacks and len(ordered) > 1:
        reason = "not tried: fallbacks disabled (provider.allow_fallbacks is false)"
        skips.extend(Skip(c.name, reason, SkipCause.NO_FALLBACK) for c in ordered[1:])
        ordered = ordered[:1]
    return Plan(tuple(ordered), tuple(skips))


def _key(name: str) -> str:
    return name.casefold()


def _why_skip(job: ImageJob, cand: Candidate) -> Skip | None:
    name, prefs = cand.name, job.prefs
    if job.pinned_backend is not None:
        if _key(name) != _key(job.pinned_backend):
            return Skip(name, f"request is pinned to {job.pinned_backend}", SkipCause.PREFERENCE, "model")
    elif prefs.only and _key(name) not in {_key(n) for n in prefs.only}:
        return Skip(name, "not in provider.only", SkipCause.PREFERENCE, "provider")
    elif _key(name) in {_key(n) for n in prefs.ignore}:
        return Skip(name, "in provider.ignore", SkipCause.PREFERENCE, "provider")

    if not cand.eligibility.ok:
        return Skip(name, cand.eligibility.reason, SkipCause.INELIGIBLE, cand.eligibility.param)

    cap = prefs.max_price
    if cap is not None:
        if cand.quote is None:
            return Skip(name, "no price sheet, so max_price cannot be checked", SkipCause.OVER_PRICE, "provider")
        if cand.quote.usd > cap:
            reason = f"quoted ${_money(cand.quote.usd)} exceeds max_price ${_money(cap)}"
            return Skip(name, reason, SkipCause.OVER_PRICE, "provider", cand.quote.usd, cap)

    health = cand.health
    if not health.available:
        retry = health.parked_for_s if health.parked_for_s > 0 else None
        return Skip(name, health.why_unavailable, SkipCause.UNAVAILABLE, retry_after_s=retry)

    latency = health.latency_p50_s
    if latency is not None and latency > job.deadline_s:
        reason = f"expected latency {latency:.1f}s exceeds the {job.deadline_s:g}s deadline"
        return Skip(name, reason, SkipCause.TOO_SLOW, DEADLINE_PARAM, expected_s=latency)

    wait = health.estimated_wait_s
    if wait is not None:
        expected = wait + (health.latency_p50_s or 0.0)
        if expected > job.deadline_s:
            reason = f"queue wait {wait:.1f}s exceeds the deadline ({expected:.1f}s expected, {job.deadline_s:g}s allowed)"
            return Skip(name, reason, SkipCause.DEADLINE, retry_after_s=wait)
    return None


def _order(job: ImageJob, survivors: list[Candidate]) -> list[Candidate]:
    if job.pinned_backend is None and job.prefs.order:
        rank = {_key(n): i for i, n in reversed(list(enumerate(job.prefs.order)))}
    else:
        rank = {}

    def key(c: Candidate) -> tuple[int, bool, Decimal, bool, float, str]:
        price = c.quote.usd if c.quote is not None else Decimal(0)
        latency = c.health.latency_p50_s
        return (
            rank.get(_key(c.name), len(rank)),
            c.quote is None,
            price,
            latency is None,
            latency or 0.0,
            c.name,
        )

    return sorted(survivors, key=key)


def _money(value: Decimal) -> str:
    return f"{value.normalize():f}"


def _listing(skips: Sequence[Skip]) -> str:
    return "; ".join(f"{s.backend}: {s.reason}" for s in skips)


def refusal(plan: Plan) -> GatewayError:
    """The error for a plan with no attempts, most actionable first:
    - 503 `no_backend_available` when a backend that could do it is down or busy
      (a retry can help; Retry-After is the soonest known recovery);
    - 400 `deadline_too_short` when backends that could do it are all expected
      to take longer than the deadline, naming the fastest one's latency (a
      retry with the same deadline cannot help; a longer one can);
    - 400 `max_price_exceeded` when the only obstacle left is the price cap,
      naming the cheapest quote;
    - 422 `no_backend_supports_request` when no allowed backend can do the job;
    - 400 `no_backend_matches_preferences` when the pin/only/ignore left nothing.
    """
    if plan.attempts:
        raise ValueError("refusal() is for empty plans")
    details = plan.details
    by_cause: dict[SkipCause, list[Skip]] = {}
    for skip in details:
        by_cause.setdefault(skip.cause, []).append(skip)

    if not details:
        return UpstreamFailed("No backend is configured for this model.", status=503, code="no_backend_available", retryable=False)
    transient = by_cause.get(SkipCause.UNAVAILABLE, []) + by_cause.get(SkipCause.DEADLINE, [])
    if transient:
        waits = [s.retry_after_s for s in transient if s.retry_after_s]
        return UpstreamFailed(
            f"No backend is available right now ({_listing(transient)}).",
            status=503,
            code="no_backend_available",
            retryable=True,
            retry_after=min(waits) if waits else None,
        )
    if SkipCause.TOO_SLOW in by_cause:
        slow = by_cause[SkipCause.TOO_SLOW]
        fastest = min(slow, key=lambda s: (s.expected_s or 0.0, s.backend))
        return InvalidRequest(
            f"The deadline is shorter than every eligible backend's expected latency: the fastest, {fastest.backend}, is expected to take {fastest.expected_s or 0.0:.1f}s; "
            f"allow more time in {DEADLINE_PARAM} ({_listing(slow)}).",
            param=DEADLINE_PARAM,
            code="deadline_too_short",
        )
    if SkipCause.OVER_PRICE in by_cause:
        over = by_cause[SkipCause.OVER_PRICE]
        priced = sorted((s.usd, s.backend, s.max_price) for s in over if s.usd is not None and s.max_price is not None)
        if priced:
            usd, backend, cap = priced[0]
            message = f"No backend can serve this request within max_price ${_money(cap)}: the cheapest eligible quote is ${_money(usd)} ({backend})."
        else:
            message = f"No backend has a known price within max_price ({_listing(over)})."
        return InvalidRequest(message, param="provider.max_price", code="max_price_exceeded")
    if SkipCause.INELIGIBLE in by_cause:
        unable = by_cause[SkipCause.INELIGIBLE]
        params = {s.param for s in unable}
        return Unprocessable(
            f"No backend supports this request ({_listing(unable)}).",
            param=params.pop() if len(params) == 1 else None,
            code="no_backend_supports_request",
        )
    params = {s.param for s in details}
    return InvalidRequest(
        f"No configured backend matches the routing preferences ({_listing(details)}).",
        param=params.pop() if len(params) == 1 else "provider",
        code="no_backend_matches_preferences",
    )
