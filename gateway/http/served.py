"""How one images request is settled, however its answer went out.

A plain answer (gateway/http/openai.py) and a stream (gateway/http/streaming.py)
end the same way: the tab settles to what was spent (the budget and the ledger
row), the request is counted in the metrics, and its one log line is written.
`Served` is what the request learnt on the way; `settle` is that ending, in
one place, so a streamed request's figures equal a plain one's by construction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from litestar import Request

from gateway.dispatch.attempts import DispatchFailed, Outcome, tried
from gateway.dispatch.progress import Progress
from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob
from gateway.money.tab import Tab
from gateway.routing.pricing import usd_text
from gateway.service import Gateway

CALLER_GONE = 499  # the status counted and written to the ledger when the caller left before the answer


@dataclass
class Served:
    """What one images request has done so far: the figures its settlement writes."""

    route: str
    started: float = field(default_factory=time.monotonic)
    status: int = 500
    backend: str | None = None
    upstream: float = 0.0
    cost: Decimal | None = None
    attempts: int = 0
    job: ImageJob | None = None
    tab: Tab | None = None
    outcome: Outcome | None = None
    progress: Progress = field(default_factory=Progress)
    deferred: bool = False  # a follow-up settles it when the provider job it left running ends
    streaming: bool = False  # its stream settles it when the stream's work ends

    def served(self, outcome: Outcome) -> None:
        self.outcome, self.status = outcome, 200
        self.backend, self.upstream, self.cost, self.attempts = outcome.backend, outcome.upstream_s, outcome.cost_usd, outcome.tried

    def failed(self, err: DispatchFailed) -> None:
        self.status, self.upstream, self.cost, self.attempts = err.status, err.upstream_s, err.cost_usd, tried(err.attempts)


def caller_gone(request: Request[Any, Any, Any]) -> bool:
    """Whether the caller disconnected while this request's work ran on without it."""
    return bool(request.scope.get("state", {}).get("klein_caller_gone"))


def mark_caller_gone(request: Request[Any, Any, Any]) -> None:
    request.scope.setdefault("state", {})["klein_caller_gone"] = True


def note_failure(request: Request[Any, Any, Any], err: GatewayError, tab: Tab | None = None, progress: Progress | None = None) -> None:
    """The x-klein-* figures of a failed request: what was spent and tried,
    what may have been billed, and the caller's rate-limit headers."""
    headers = getattr(request.state, "klein_headers", None)
    if headers is None:
        return
    if isinstance(err, DispatchFailed):
        headers.update({"x-klein-cost-usd": usd_text(err.cost_usd), "x-klein-attempts": str(tried(err.attempts))})
        if err.possibly_billed_usd:
            headers["x-klein-possibly-billed-usd"] = usd_text(err.possibly_billed_usd)
    elif progress is not None and progress.attempts:  # dispatch was cancelled: what it spent is still what it cost
        headers.update({"x-klein-cost-usd": usd_text(progress.spent), "x-klein-attempts": str(tried(progress.attempts))})
    else:
        headers.update({"x-klein-cost-usd": "0", "x-klein-attempts": "0"})
    if tab is not None:
        headers.update(tab.headers)


async def settle(request: Request[Any, Any, Any], gw: Gateway, rec: Served) -> None:
    """The request's end: budget and ledger (unless a follow-up will), metrics, the log line."""
    request.scope.setdefault("state", {})["klein_observed"] = True
    if rec.cost is None and rec.progress.attempts:  # dispatch was cancelled: what it spent before is still owed
        rec.cost, rec.attempts, rec.upstream = rec.progress.spent, tried(rec.progress.attempts), rec.progress.upstream_s
    if caller_gone(request):
        rec.status = CALLER_GONE  # the real cost and backend stay: the work ran, nobody got the answer
    outcome = rec.outcome
    if rec.tab is not None and not rec.deferred:
        await gw.billing.settle(
            rec.tab,
            status=rec.status,
            backend=rec.backend,
            attempts=rec.attempts,
            images=len(outcome.images) if outcome else 0,
            cost=rec.cost,
            billed=gw.billed_figure(outcome),
            megapixels=outcome.megapixels if outcome else None,
        )
    total = time.monotonic() - rec.started
    overhead = max(0.0, total - rec.upstream)
    gw.metrics.observe_request(route=rec.route, status=rec.status, backend=rec.backend, latency_s=total, overhead_s=overhead)
    gw.log_request(
        request, route=rec.route, status=rec.status, backend=rec.backend, attempts=rec.attempts, cost=rec.cost, latency_s=total, overhead_s=overhead, prompt=rec.job.prompt if rec.job else None
    )
