"""What money per caller adds to one request: admit, reserve, settle, ledger row.

Runs the request path's billing calls (`Tab.admit`, `Tab.reserve`,
`Billing.settle`) in a closed loop, without HTTP or a backend, for keys with
more and more rules, on memory and on a real Redis started on 127.0.0.1, and
prints the cost per request side by side (p50 and p99, microseconds):

    python bench/billing.py            # 2,000 requests per cell
    python bench/billing.py -n 500

Without Redis the ledger row is committed before `settle` returns (its cost is
in the request's figures; bench/ledger.py measures it alone, before and after);
the `ledger flush / row` column measures a flush of whatever is left.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from gateway.domain.capabilities import Eligibility
from gateway.domain.job import ImageJob, JobKind
from gateway.health.view import HealthView
from gateway.money.budgets import MemoryBudgets, RedisBudgets
from gateway.money.keys import Caller, KeyRing, KeySpec
from gateway.money.ledger import Ledger, SqliteLedger
from gateway.money.ratelimit import RateLimiter
from gateway.money.tab import Billing
from gateway.observability.metrics import GatewayMetrics
from gateway.routing.plan import Candidate, Plan
from gateway.routing.pricing import Quote

KEYS = {
    "no rules": {},
    "budget": {"budget_usd": {"day": 1_000_000, "month": 1_000_000}},
    "rate limit": {"rate_limit": {"requests_per_minute": 10_000_000, "images_per_minute": 10_000_000}},
    "budget + limits": {"budget_usd": {"day": 1_000_000, "month": 1_000_000}, "rate_limit": {"requests_per_minute": 10_000_000, "images_per_minute": 10_000_000}},
}
PLAN = Plan(tuple(Candidate(n, Eligibility(True), Quote(Decimal(q), "per_image", ""), HealthView()) for n, q in (("local", "0.00041506"), ("fal", "0.00524288"), ("runflow", "0.01404858"))), ())
JOB = ImageJob(kind=JobKind.GENERATE, prompt="bench", width=1024, height=1024)


async def cell(billing: Billing, spec: KeySpec, n: int) -> list[float]:
    caller = Caller(spec.name, spec)
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        tab = billing.tab(caller, f"req_{i}", "generations")
        await tab.admit(JOB)
        await tab.reserve(PLAN)
        await billing.settle(tab, status=200, backend="local", attempts=1, images=1, cost=Decimal("0.00041506"))
        took.append(time.perf_counter() - t0)
    return took


async def flush_cost(billing: Billing) -> float:
    pending = billing.ledger.pending
    t0 = time.perf_counter()
    await billing.ledger.flush()
    return (time.perf_counter() - t0) / max(1, pending)


def billing_on(store: str, redis_url: str | None, tmp: Path) -> Billing:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    budgets = RedisBudgets(redis_url, namespace=ns) if store == "redis" else MemoryBudgets()
    limiter = RateLimiter(redis_url if store == "redis" else None, namespace=ns)
    ledger = Ledger(SqliteLedger(tmp / f"{ns}.sqlite3"), interval_s=3600)
    return Billing(KeyRing(), limiter, budgets, ledger, GatewayMetrics(registry=CollectorRegistry()))


async def main(n: int) -> None:
    from tests.redis_server import RedisServer, redis_available

    stores = ["memory"] + (["redis"] if redis_available() else [])
    server = RedisServer().start() if "redis" in stores else None
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for store in stores:
                for label, rules in KEYS.items():
                    billing = billing_on(store, server.url if server else None, Path(tmp))
                    spec = KeySpec(name="bench", key_sha256="a" * 64, **rules)
                    await cell(billing, spec, min(200, n))  # warm-up
                    await billing.ledger.flush()
                    took = await cell(billing, spec, n)
                    per_row = await flush_cost(billing)
                    await billing.close()
                    q = statistics.quantiles(took, n=100)
                    rows.append((store, label, q[49] * 1e6, q[98] * 1e6, per_row * 1e6))
    finally:
        if server is not None:
            server.close()
    print(f"{n} requests per cell; microseconds per request (the ledger write is per row, in the background)")
    print(f"{'store':<8} {'key':<16} {'p50 us':>9} {'p99 us':>9} {'ledger flush / row us':>22}")
    for store, label, p50, p99, per_row in rows:
        print(f"{store:<8} {label:<16} {p50:>9.1f} {p99:>9.1f} {per_row:>22.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="requests per cell")
    asyncio.run(main(parser.parse_args().n))
