"""The gateway's parts, assembled: what a request handler calls.

`Gateway.images(job)` prices the job on every backend, asks the router for a
plan and hands it to dispatch. `Gateway.quote(job)` is the same without the
dispatch. HTTP stays in gateway/api; this module holds no wire shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from gateway.config import GatewayConfig
from gateway.dispatch.attempts import Dispatcher, Outcome
from gateway.dispatch.fleet import BackendFleet
from gateway.dispatch.progress import Progress
from gateway.dispatch.references import vet_reference_hosts
from gateway.dispatch.shutdown import Drain
from gateway.domain.job import ImageJob
from gateway.files import Files
from gateway.health.tracker import HealthTracker
from gateway.images import ImageStore
from gateway.jobs.service import Jobs
from gateway.money.idempotency import Idempotency
from gateway.money.keys import KeyRing
from gateway.money.reconcile import billed_source
from gateway.money.tab import Billing, Tab
from gateway.net.pinning import Resolver, SystemResolver
from gateway.net.wire import Wire
from gateway.observability.logs import RequestLogger
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.metrics_access import MetricsAccess
from gateway.routing.plan import Plan, plan, refusal
from gateway.routing.pricing import usd_text


@dataclass
class Gateway:
    config: GatewayConfig
    fleet: BackendFleet
    health: HealthTracker
    dispatcher: Dispatcher
    metrics: GatewayMetrics
    images_store: ImageStore
    keys: frozenset[str]
    store: Any  # the state store, for readiness
    keyring: KeyRing
    billing: Billing
    clients: list[Wire | httpx.AsyncClient] = field(default_factory=list)  # the upstream wire, the reference fetcher
    request_log: RequestLogger = field(default_factory=RequestLogger)
    resolver: Resolver = field(default_factory=SystemResolver)  # reference URL hosts, checked on arrival
    metrics_access: MetricsAccess = field(default_factory=MetricsAccess)
    ready: bool = False
    in_flight: int = 0
    follow_ups: set[asyncio.Task[None]] = field(default_factory=set)  # provider jobs followed after their answer (gateway/http/followups.py)
    drain: Drain = field(default_factory=lambda: Drain(grace_s=25.0))
    jobs: Jobs = field(default=None)  # type: ignore[assignment]  # async jobs; build_gateway sets it
    idempotency: Idempotency = field(default=None)  # type: ignore[assignment]
    files: Files = field(default=None)  # type: ignore[assignment]  # uploads (/v1/files); build_gateway sets it
    batches: Any = None  # the batch driver (gateway.batches.runner.BatchRunner, a layer above); create_app sets it

    @property
    def busy(self) -> int:
        """Requests in flight and follow-ups still settling: what a shutdown waits for."""
        return self.in_flight + len(self.follow_ups)

    @contextlib.contextmanager
    def admission(self) -> Iterator[bool]:
        """Whether one more request fits under `max_in_flight` in this process."""
        admitted = self.in_flight < self.config.settings.max_in_flight
        if admitted:
            self.in_flight += 1
        try:
            yield admitted
        finally:
            if admitted:
                self.in_flight -= 1

    def log_request(self, request: Any, *, route: str, status: int, backend: str | None, attempts: int, cost: Decimal | None, latency_s: float, overhead_s: float, prompt: str | None = None) -> None:
        """The request's one JSON log line (no prompt text, no secrets)."""
        state = request.state
        self.request_log.log(
            request_id=getattr(state, "request_id", "-"),
            route=route,
            status=status,
            backend=backend,
            attempts=attempts,
            cost_usd=cost or Decimal(0),
            latency_s=latency_s,
            overhead_s=overhead_s,
            caller=getattr(state, "caller", None),
            prompt=prompt,
        )

    async def plan(self, job: ImageJob) -> Plan:
        views = await self.health.views(self.fleet.backends)
        return plan(job, self.fleet.candidates(job, views))

    def billed_figure(self, outcome: Outcome | None) -> tuple[Decimal, str] | None:
        """The serving provider's own billed figure and its source, where it gave one."""
        if outcome is None or outcome.billed_usd is None:
            return None
        backend = self.fleet.backends.get(outcome.backend)
        return outcome.billed_usd, billed_source(backend.kind if backend else "")

    async def images(self, job: ImageJob, *, started: float, base_url: str, tab: Tab | None = None, keep_images_s: int | None = None, progress: Progress | None = None) -> Outcome:
        """Plan, reserve and dispatch. `keep_images_s`: the lifetime of the record
        that will refer to the images (GatewaySettings.images_kept_s); `progress`:
        what the request learns of the dispatch (gateway/dispatch/progress.py)."""
        p = await self.routed(job, tab)
        return await self.dispatch(job, p, started=started, base_url=base_url, tab=tab, keep_images_s=keep_images_s, progress=progress)

    async def routed(self, job: ImageJob, tab: Tab | None = None) -> Plan:
        """The first half of `images`: the plan, priced and reserved, or the refusal.
        A stream answers its errors with an HTTP status up to here, and in the stream after."""
        await vet_reference_hosts(job.references, self.resolver)  # before any provider is handed a URL
        p = await self.plan(job)
        if not p.attempts:
            raise refusal(p)
        if tab is not None:
            p = await tab.reserve(p)  # the budget, before any provider is called
        return p

    async def dispatch(self, job: ImageJob, p: Plan, *, started: float, base_url: str, tab: Tab | None = None, keep_images_s: int | None = None, progress: Progress | None = None) -> Outcome:
        """The second half of `images`: the plan run, with failover."""
        return await self.dispatcher.run(job, p, started=started, base_url=base_url, cover=tab.cover if tab else None, keep_images_s=keep_images_s, progress=progress)

    async def quote_table(self, job: ImageJob) -> dict[str, Any]:
        """Every backend's price and eligibility for this job, and the one that would be chosen."""
        views = await self.health.views(self.fleet.backends)
        cands = self.fleet.candidates(job, views)
        p = plan(job, cands)
        skipped = dict(p.skipped)
        rows = []
        for c in sorted(cands, key=lambda c: (c.quote.usd if c.quote else Decimal("Infinity"), c.name)):
            rows.append(
                {
                    "name": c.name,
                    "eligible": c.eligibility.ok,
                    "size": c.served(job).size,
                    "reason": skipped.get(c.name, "") or c.eligibility.reason,
                    "cost_usd": usd_text(c.quote.usd) if c.quote else None,
                    "basis": c.quote.basis if c.quote else None,
                    "breakdown": c.quote.breakdown if c.quote else None,
                    "state": c.health.state.value if c.health.available else (c.health.why_unavailable or c.health.state.value),
                }
            )
        for name, reason in sorted(self.fleet.disabled.items()):
            rows.append({"name": name, "eligible": False, "reason": reason, "cost_usd": None, "basis": None, "breakdown": None, "state": "disabled"})
        chosen = p.chosen.name if p.chosen else None
        return {
            "object": "quote",
            "model": "flux-2-klein-4b",
            "size": job.size,
            "n": job.n,
            "kind": job.kind.value,
            "chosen": chosen,
            "chosen_size": p.chosen.served(job).size if p.chosen else None,  # what the chosen backend would produce
            "cost_usd": usd_text(p.chosen.quote.usd) if p.chosen and p.chosen.quote else None,
            "order": [c.name for c in p.attempts],
            "backends": rows,
        }

    async def close(self) -> None:
        if self.follow_ups:  # settled (budget, ledger) before the billing closes; cancelled past the grace
            _, late = await asyncio.wait(list(self.follow_ups), timeout=self.drain.grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.dispatcher.drain()
        await self.billing.close()  # after the last request: every ledger row is written
        for client in self.clients:
            await client.aclose()
        if self.jobs is not None:
            await self.jobs.close()
        await self.health.close()
        await self.store.close()
        await self.images_store.close()
