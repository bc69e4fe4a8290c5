"""What a durable ledger row costs one request: before (queued in memory) and after, side by side.

`Billing.settle` for a budgeted key, in a closed loop without HTTP or a
backend, `-c` requests at a time, in both modes:

- memory budgets, SQLite file ledger: before, the row was appended to a list
  a background task wrote every 0.25 s (lost on SIGKILL); after, `settle`
  returns once the row is committed (rows that wait for a running write join
  it: one transaction for all of them);
- Redis budgets (a redis-server the script starts on 127.0.0.1): before, the
  budget settle was one Lua call and the row went to the list; after, one Lua
  call settles the budget and XADDs the row to the ledger stream (the drain
  into SQLite runs in the background, as the row list's write did).

    python bench/ledger.py              # 2,000 settles per cell
    python bench/ledger.py -n 500 -c 1 -c 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from gateway.money.budgets import MemoryBudgets, RedisBudgets, windows_at
from gateway.money.keys import Caller, KeyRing, KeySpec
from gateway.money.ledger import Ledger, LedgerStream, SqliteLedger, UsageRow
from gateway.money.ratelimit import RateLimiter
from gateway.money.tab import Billing
from gateway.observability.metrics import GatewayMetrics
from tests.redis_server import RedisServer


class QueuedLedger(Ledger):
    """The writer before this change: record() only appends; a background task writes later."""

    async def record(self, row: UsageRow) -> bool:
        self._queued.append(row)
        return True


def billing(mode: str, when: str, tmp: Path, redis_url: str | None) -> Billing:
    ns = uuid.uuid4().hex[:8]
    store = SqliteLedger(tmp / f"{mode}-{when}-{ns}.sqlite3")
    stream = LedgerStream(redis_url, namespace=ns) if redis_url and when == "after" else None
    ledger = (QueuedLedger if when == "before" else Ledger)(store, stream=stream)
    budgets = RedisBudgets(redis_url, namespace=ns) if redis_url else MemoryBudgets()
    return Billing(KeyRing(), RateLimiter(redis_url, namespace=ns), budgets, ledger, GatewayMetrics(registry=CollectorRegistry()))


async def cell(b: Billing, n: int, concurrency: int) -> tuple[list[float], float]:
    spec = KeySpec.model_validate({"name": "team", "key_sha256": "0" * 64, "budget_usd": {"day": "1000000"}})
    windows = windows_at(spec.budget_usd.windows(), datetime.now(UTC))
    b.ledger.start()
    took: list[float] = []

    async def one(i: int) -> None:
        tab = b.tab(Caller("team", spec), f"req_{i}", "generations")
        tab.windows, tab.reserved_units = windows, 200_000
        t = time.perf_counter()
        await b.settle(tab, status=200, backend="fal", attempts=1, images=1, cost=Decimal("0.00131072"), megapixels=Decimal("0.262144"))
        took.append((time.perf_counter() - t) * 1e6)

    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await b.close()
    return took, n / wall


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="settles per cell")
    parser.add_argument("-c", type=int, action="append", help="requests at a time (repeatable; default 1 and 32)")
    args = parser.parse_args()
    levels = args.c or [1, 32]
    print(f"{args.n} settles per cell; microseconds per settle and settles per second (before: row queued in memory; after: row durable)")
    print(f"{'budgets':<8} {'c':>3} {'before p50':>11} {'before p99':>11} {'before /s':>10} {'after p50':>10} {'after p99':>10} {'after /s':>9} {'added p50':>10}")
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        redis.start()
        for mode, url in (("memory", None), ("redis", redis.url)):
            for c in levels:
                before, before_rate = await cell(billing(mode, "before", Path(tmp), url), args.n, c)
                after, after_rate = await cell(billing(mode, "after", Path(tmp), url), args.n, c)
                b50, a50 = p(before, 50), p(after, 50)
                print(f"{mode:<8} {c:>3} {b50:>11.0f} {p(before, 99):>11.0f} {before_rate:>10.0f} {a50:>10.0f} {p(after, 99):>10.0f} {after_rate:>9.0f} {a50 - b50:>+10.0f}")


if __name__ == "__main__":
    asyncio.run(main())
