"""The Redis ledger stream: settle and row in one step, drained once, kept while the database is away."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis

from gateway.money.ledger import Ledger, LedgerStream, SqliteLedger, UsageRow
from gateway.money.ledger.stream import row_fields, row_from_fields
from gateway.observability.metrics import GatewayMetrics

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WINDOW = (T0 - timedelta(hours=1), T0 + timedelta(hours=1))


def row(i: int, *, run: int = 1) -> UsageRow:
    return UsageRow(
        at=T0 + timedelta(seconds=i),
        request_id=f"req_{i}",
        key_name="team",
        route="generations",
        backend="fal",
        attempts=1,
        images=1,
        megapixels=Decimal("0.262144"),
        estimated_usd=Decimal("0.00131072"),
        billed_usd=None,
        billed_source=None,
        status=200,
        run=run,
    )


@pytest.fixture
def namespace() -> str:
    return f"stream-{uuid.uuid4().hex[:8]}"


def test_a_row_survives_the_trip_through_the_stream_unchanged():
    original = row(1)
    billed = UsageRow(**{**{f: getattr(original, f) for f in original.__dataclass_fields__}, "billed_usd": Decimal("0.0155"), "billed_source": "run_cost", "backend": None})
    assert row_from_fields(row_fields(original)) == original
    assert row_from_fields(row_fields(billed)) == billed


async def test_the_budget_and_the_row_change_together(redis_server, namespace):
    stream = LedgerStream(redis_server.url, namespace=namespace)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    counter = f"klein:{namespace}:budget:{{team}}:day:2026-12-01"
    r.set(counter, 500)
    await stream.settle([counter], -200, row(1))
    assert r.get(counter) == "300" and await stream.backlog() == 1
    await stream.settle([counter], -1000, row(2))  # never below zero
    assert r.get(counter) == "0" and await stream.backlog() == 2
    await stream.close()


async def test_a_drainer_killed_after_its_insert_and_before_its_ack_does_not_double_the_row(redis_server, namespace, tmp_path):
    store = SqliteLedger(tmp_path / "usage.sqlite3")
    first = LedgerStream(redis_server.url, namespace=namespace, claim_idle_s=0.2)
    await first.settle([], 0, row(1))
    dying = Ledger(store, stream=first)

    async def killed(ids: list[str]) -> None:
        raise ConnectionError("the replica died before its XACK")

    first.ack = killed  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await dying.drain_once()
    assert len(store.fetch(*WINDOW)) == 1  # the insert committed; the entry is still pending to the dead consumer

    second = LedgerStream(redis_server.url, namespace=namespace, claim_idle_s=0.2)
    survivor = Ledger(store, stream=second)
    assert await survivor.drain_once() == 0  # not idle long enough yet: the first may still be alive
    await asyncio.sleep(0.3)
    assert await survivor.drain_once() == 1  # claimed from the dead consumer and written again...
    assert [r.request_id for r in store.fetch(*WINDOW)] == ["req_1"]  # ...once
    assert await second.backlog() == 0
    # Another run of the same request (an async job taken over) is a row of its own.
    await second.settle([], 0, row(1, run=2))
    assert await survivor.drain_once() == 1
    assert sorted(r.run for r in store.fetch(*WINDOW)) == [1, 2]
    await first.close()
    await second.close()
    store.close()


async def test_rows_wait_in_the_stream_while_the_database_is_away_and_are_written_when_it_returns(redis_server, namespace, tmp_path):
    class Away(SqliteLedger):
        down = True

        def insert(self, rows):
            if self.down:
                raise OSError("database unreachable")
            super().insert(rows)

    store = Away(tmp_path / "usage.sqlite3")
    metrics = GatewayMetrics()
    stream = LedgerStream(redis_server.url, namespace=namespace)
    ledger = Ledger(store, stream=stream, metrics=metrics, interval_s=0.05, batch=4)
    ledger.start()
    for i in range(10):
        await stream.settle([], 0, row(i))

    def backlog() -> float:
        return metrics.registry.get_sample_value("klein_ledger_backlog_rows") or 0.0

    for _ in range(100):
        if backlog() == 10:
            break
        await asyncio.sleep(0.02)
    assert backlog() == 10 and await stream.backlog() == 10  # all still in Redis; in memory at most one batch
    assert ledger.pending <= 4 and store.fetch(*WINDOW) == []

    store.down = False
    for _ in range(200):
        if backlog() == 0 and len(store.fetch(*WINDOW)) == 10:
            break
        await asyncio.sleep(0.02)
    assert [r.request_id for r in store.fetch(*WINDOW)] == [f"req_{i}" for i in range(10)]
    assert backlog() == 0 and await stream.backlog() == 0
    await ledger.close()


async def test_close_drains_what_is_left(redis_server, namespace, tmp_path):
    store = SqliteLedger(tmp_path / "usage.sqlite3")
    stream = LedgerStream(redis_server.url, namespace=namespace)
    ledger = Ledger(store, stream=stream, interval_s=3600, batch=3)  # the loop never gets to it
    for i in range(7):
        await stream.settle([], 0, row(i))
    await ledger.close()
    assert len(SqliteLedger(tmp_path / "usage.sqlite3").fetch(*WINDOW)) == 7
