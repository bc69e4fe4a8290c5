"""Money per caller, for one request: admit, reserve, settle, record.

The request path calls four things, in order:
- `Billing.tab(caller, request_id, route)`: the request's tab;
- `tab.admit(job)`: the key's rules applied to the job (its allowed backends,
  its default and ceiling `max_price`), and its rate limits counted;
- `tab.reserve(plan)`: before any provider is called, the worst case (the
  quote of the most expensive backend the plan could fail over to, for all
  its images) is reserved in every budget window, atomically across replicas;
  when it does not fit, the plan is cut to the backends the budget can pay
  for (the largest worst case that fits is reserved instead);
- `tab.cover(total)`: dispatch asks before failing over after a billed
  failure, so paying twice cannot overspend either;
- `Billing.settle(tab, ...)`: the reservation is settled to what the request
  cost, the ledger gets its row, and the provider's billed figure (where one
  came back) is counted beside the gateway's estimate. With Redis the budget
  settle and the row are one atomic step (the ledger stream); without it the
  row is committed to the ledger store before settle returns. Either way it
  happens before the answer is sent, so an answered request has its row.

`apply_key_rules` and `worst_case` are pure; stores are behind the edges.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob
from gateway.money.budgets import BudgetStore, BudgetUnavailable, RedisBudgets, Window, from_units, to_units, windows_at
from gateway.money.keys import Caller, KeyRing, KeySpec
from gateway.money.ledger import Ledger, UsageRow
from gateway.money.ledger.stream import StreamUnavailable
from gateway.money.ratelimit import RateLimiter
from gateway.observability.metrics import GatewayMetrics
from gateway.routing.plan import Plan, Skip, SkipCause
from gateway.routing.pricing import usd_text

log = logging.getLogger("klein.billing")

ANONYMOUS = "anonymous"


class BudgetExceeded(GatewayError):
    """OpenAI's convention for "you have no money left": 429 insufficient_quota, do not retry."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    retryable_default = False


class BudgetExhausted(BudgetExceeded):
    """An async job whose owner has no budget left for it: failed before any provider is called."""

    code = "budget_exhausted"


class OwnerKeyRevoked(GatewayError):
    """An async job whose owner's key is no longer in force: nobody may pay for it, so it never runs."""

    status = 403
    type = "permission_error"
    code = "owner_key_revoked"
    retryable_default = False


def budget_unavailable() -> GatewayError:
    return GatewayError("the budget store cannot be reached, so this key's budget cannot be checked; retry shortly", status=503, code="budget_unavailable", retryable=True, retry_after=1)


class BackendNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "backend_not_allowed"
    retryable_default = False


def _folded(names: tuple[str, ...]) -> set[str]:
    return {n.casefold() for n in names}


def apply_key_rules(job: ImageJob, spec: KeySpec | None) -> ImageJob:
    """The job as the key may run it.

    - `backends.only`/`ignore` are enforced: a pin to a backend the key may
      not use is refused (403); the caller's own `provider.only` narrows the
      key's list but can never widen it; `ignore` lists add up.
    - `max_price_usd` is the default `provider.max_price`, and its ceiling:
      a caller may ask for less, never more."""
    if spec is None:
        return job
    rules, prefs = spec.backends, job.prefs
    if job.pinned_backend is not None and not rules.allows(job.pinned_backend):
        raise BackendNotAllowed(f"this key may not use backend {job.pinned_backend}", param="model")
    only = prefs.only
    if rules.only:
        only = tuple(b for b in prefs.only if b.casefold() in _folded(rules.only)) if prefs.only else rules.only
        if not only:
            raise BackendNotAllowed(f"provider.only names no backend this key may use (allowed: {', '.join(rules.only)})", param="provider.only")
    ignore = tuple(dict.fromkeys((*prefs.ignore, *rules.ignore)))
    cap = prefs.max_price
    if spec.max_price_usd is not None:
        cap = spec.max_price_usd if cap is None else min(cap, spec.max_price_usd)
    return dataclasses.replace(job, prefs=dataclasses.replace(prefs, only=only, ignore=ignore, max_price=cap))


def worst_case(plan: Plan) -> Decimal:
    """The most the plan can cost in one billed attempt: its dearest quote (all images)."""
    return max((c.quote.usd for c in plan.attempts if c.quote is not None), default=Decimal(0))


def worst_cases(plan: Plan) -> list[Decimal]:
    """The worst case of the plan and of each shorter plan that drops its dearest
    backends: the distinct quotes, largest first. Reserving one of them keeps the
    backends quoted at or below it."""
    return sorted({c.quote.usd if c.quote is not None else Decimal(0) for c in plan.attempts}, reverse=True)


def within(plan: Plan, ceiling: Decimal) -> Plan:
    """The plan without the backends quoted above `ceiling` (order kept), each noted as skipped."""
    kept = tuple(c for c in plan.attempts if (c.quote.usd if c.quote is not None else Decimal(0)) <= ceiling)
    dropped = tuple(
        Skip(c.name, f"quoted ${usd_text(c.quote.usd)}, more than the key's budget has left", SkipCause.OVER_PRICE, usd=c.quote.usd) for c in plan.attempts if c not in kept and c.quote is not None
    )
    return dataclasses.replace(plan, attempts=kept, details=plan.details + dropped) if dropped else plan


@dataclass
class Tab:
    """What one request has been admitted to spend, and by whom."""

    billing: Billing
    caller: Caller | None
    request_id: str
    route: str
    headers: dict[str, str] = field(default_factory=dict)  # rate-limit headers for the answer
    job: ImageJob | None = None
    windows: list[Window] = field(default_factory=list)
    reserved_units: int = 0
    # Told of every change to the reservation, so an async job's record can
    # hand it to the replica that takes the job over (gateway/jobs/worker.py).
    on_reserved: Callable[[list[Window], int], Awaitable[None]] | None = None
    # Which settle of `request_id` this is (the ledger row's `run`): an async job's run number.
    run: int = 1

    def adopt(self, windows: list[Window], units: int) -> None:
        """Take over a reservation an earlier run made and never settled: settling this tab settles it."""
        self.windows, self.reserved_units = windows, units

    async def _reserved(self) -> None:
        if self.on_reserved is not None:
            await self.on_reserved(self.windows, self.reserved_units)

    @property
    def key_name(self) -> str:
        return self.caller.name if self.caller else ANONYMOUS

    @property
    def spec(self) -> KeySpec | None:
        return self.caller.spec if self.caller else None

    async def admit(self, job: ImageJob) -> ImageJob:
        self.job = apply_key_rules(job, self.spec)
        spec = self.spec
        if spec is not None and (spec.rate_limit.requests_per_minute or spec.rate_limit.images_per_minute):
            try:
                verdict = await self.billing.limiter.admit(spec.name, spec.rate_limit, job.n)
            except GatewayError as err:
                self.headers.update(getattr(err, "limit_headers", {}))
                raise
            self.headers.update(verdict.headers)
        return self.job

    async def reserve(self, plan: Plan) -> Plan:
        """Reserve the worst case in every budget window, or refuse (429).

        The whole plan's worst case when it fits; otherwise the largest that
        does, and the plan loses the backends dearer than it (the request
        still runs, with fewer fallbacks); when not even the cheapest fits,
        a refusal naming the budget and when it resets."""
        spec = self.spec
        if spec is None or not spec.budget_usd.windows():
            return plan
        options = worst_cases(plan)
        windows = windows_at(spec.budget_usd.windows(), datetime.now(UTC))
        try:
            taken, refused = await self.billing.budgets.reserve_largest(spec.name, windows, [to_units(o) for o in options])
        except BudgetUnavailable:
            raise budget_unavailable() from None
        if taken is None or refused is not None:
            refused = refused or windows[0]
            resets = refused.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            raise BudgetExceeded(
                f"this request costs at least ${usd_text(options[-1])}, which would take key {spec.name} over its {refused.name} budget "
                f"of ${usd_text(refused.limit_usd)}; the {refused.name} budget resets at {resets}",
                details={"budget": refused.name, "limit_usd": usd_text(refused.limit_usd), "resets_at": resets},
            )
        self.windows, self.reserved_units = windows, self.reserved_units + taken  # added to what a resumed run reserved
        await self._reserved()
        return within(plan, from_units(taken))

    async def ensure_budget_left(self) -> None:
        """Refuse (429 `budget_exhausted`) when a budget window has nothing left,
        what this tab already holds aside: for an async job, which should not
        run (not even on a free backend) once its owner's budget is spent."""
        spec = self.spec
        if spec is None or not spec.budget_usd.windows():
            return
        windows = windows_at(spec.budget_usd.windows(), datetime.now(UTC))
        try:
            spent = await self.billing.budgets.spent(spec.name, windows)
        except BudgetUnavailable:
            raise budget_unavailable() from None
        held = {w.period: self.reserved_units for w in self.windows}
        for window, units in zip(windows, spent, strict=True):
            if units - held.get(window.period, 0) >= window.limit_units:
                resets = window.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                raise BudgetExhausted(
                    f"key {spec.name} has spent its {window.name} budget of ${usd_text(window.limit_usd)}, so the job was not run; the {window.name} budget resets at {resets}",
                    details={"budget": window.name, "limit_usd": usd_text(window.limit_usd), "resets_at": resets},
                )

    async def reserve_amount(self, amount: Decimal) -> None:
        """Reserve `amount` in every budget window, or refuse (429): for work
        whose price is already known (a provider job taken over from a dead
        replica), so it is paid from the budget like a fresh run."""
        spec = self.spec
        if spec is None or not spec.budget_usd.windows():
            return
        windows = windows_at(spec.budget_usd.windows(), datetime.now(UTC))
        try:
            refused = await self.billing.budgets.reserve(spec.name, windows, to_units(amount))
        except BudgetUnavailable:
            raise budget_unavailable() from None
        if refused is not None:
            resets = refused.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            raise BudgetExceeded(
                f"this job costs ${usd_text(amount)}, which would take key {spec.name} over its {refused.name} budget of ${usd_text(refused.limit_usd)}; the {refused.name} budget resets at {resets}",
                details={"budget": refused.name, "limit_usd": usd_text(refused.limit_usd), "resets_at": resets},
            )
        self.windows, self.reserved_units = windows, self.reserved_units + to_units(amount)
        await self._reserved()

    async def cover(self, total: Decimal) -> None:
        """Before failing over after a billed failure: grow the reservation to
        `total` (spent so far plus the next attempt's quote), or refuse (429),
        so a request that pays twice still cannot take a window over its limit."""
        extra = to_units(total) - self.reserved_units
        spec = self.spec
        if not self.windows or extra <= 0 or spec is None:
            return
        try:
            refused = await self.billing.budgets.reserve(spec.name, self.windows, extra)
        except BudgetUnavailable:
            raise budget_unavailable() from None
        if refused is not None:
            resets = refused.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            raise BudgetExceeded(
                f"an attempt failed after it was billed, and trying the next backend (up to ${usd_text(total)} in all) would take key "
                f"{spec.name} over its {refused.name} budget of ${usd_text(refused.limit_usd)}; the {refused.name} budget resets at {resets}",
                details={"budget": refused.name, "limit_usd": usd_text(refused.limit_usd), "resets_at": resets},
            )
        self.reserved_units += extra
        await self._reserved()


@dataclass
class Billing:
    keyring: KeyRing
    limiter: RateLimiter
    budgets: BudgetStore
    ledger: Ledger
    metrics: GatewayMetrics

    def tab(self, caller: Caller | None, request_id: str, route: str) -> Tab:
        return Tab(self, caller, request_id, route)

    async def settle(
        self, tab: Tab, *, status: int, backend: str | None, attempts: int, images: int, cost: Decimal | None, billed: tuple[Decimal, str] | None = None, megapixels: Decimal | None = None
    ) -> None:
        """Settle the reservation to `cost` and write the request's ledger row.
        `billed` is the provider's own figure and where it came from;
        `megapixels` what was produced, where known (a shape request may be
        served at a size other than the one it resolved to)."""
        cost = cost or Decimal(0)
        if billed is not None and backend is not None:
            self.metrics.record_billed(backend=backend, source=billed[1], billed_usd=billed[0], estimated_usd=cost)
        job = tab.job
        if megapixels is None:
            megapixels = job.megapixels * images if job is not None else Decimal(0)
        row = UsageRow(
            at=datetime.now(UTC),
            request_id=tab.request_id,
            key_name=tab.key_name,
            route=tab.route,
            backend=backend,
            attempts=attempts,
            images=images,
            megapixels=megapixels,
            estimated_usd=cost,
            billed_usd=billed[0] if billed else None,
            billed_source=billed[1] if billed else None,
            status=status,
            run=tab.run,
        )
        delta = to_units(cost) - tab.reserved_units if tab.windows else 0
        stream = self.ledger.stream
        if stream is not None:
            # The fleet: budget and row in one Redis step, so neither exists without the other.
            counters: list[str] = []
            if tab.windows:
                if isinstance(self.budgets, RedisBudgets):
                    counters = self.budgets.counters(tab.key_name, tab.windows)
                else:
                    await self._settle_budget(tab, delta)
            try:
                await stream.settle(counters, delta, row)
                return
            except StreamUnavailable as exc:
                log.error(
                    "ledger stream unreachable (%s) for request %s: budget adjustment %s USD for key %s not applied; the row goes to the ledger store directly",
                    exc,
                    tab.request_id,
                    usd_text(from_units(delta)),
                    tab.key_name,
                )
        elif tab.windows:
            await self._settle_budget(tab, delta)
        if not await self.ledger.record(row):
            log.error("usage row of request %s not yet in the ledger store (store away); kept for the next write", tab.request_id)

    async def _settle_budget(self, tab: Tab, delta: int) -> None:
        try:
            await self.budgets.settle(tab.key_name, tab.windows, delta)
        except BudgetUnavailable:
            log.error("budget settle failed for key %s (adjustment %s USD not applied)", tab.key_name, usd_text(from_units(delta)))

    async def start(self) -> None:
        self.ledger.start()

    async def close(self) -> None:
        await self.ledger.close()
        await self.limiter.close()
        await self.budgets.close()
