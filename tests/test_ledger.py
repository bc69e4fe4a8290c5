"""The usage ledger on SQLite and on a real PostgreSQL: same rows, exact money,
append-only, migrations applied once, batched writes that lose nothing at close."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gateway.money.ledger import Ledger, PostgresLedger, SqliteLedger, UsageRow, summarise
from gateway.money.ledger.stores import migrations

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def row(i: int, *, key: str = "team-a", backend: str | None = "fal", cost: str = "0.00131072", billed: str | None = None, at: datetime | None = None, status: int = 200) -> UsageRow:
    return UsageRow(
        at=at or T0 + timedelta(minutes=i),
        request_id=f"req_{i}",
        key_name=key,
        route="generations",
        backend=backend,
        attempts=1,
        images=1,
        megapixels=Decimal("0.262144"),
        estimated_usd=Decimal(cost),
        billed_usd=None if billed is None else Decimal(billed),
        billed_source=None if billed is None else "run_cost",
        status=status,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteLedger(tmp_path / "usage.sqlite3")
    else:
        server = request.getfixturevalue("postgres_server")
        s = PostgresLedger(server.create_database(f"ledger_{uuid.uuid4().hex[:10]}"))
    yield s
    s.close()


def test_rows_come_back_exactly_as_written(store):
    written = [row(1), row(2, cost="0.01540000", billed="0.01545344"), row(3, backend=None, cost="0", status=429)]
    store.insert(written)
    assert store.fetch(T0, T0 + timedelta(hours=1)) == written


def test_money_stays_exact_over_many_rows(store):
    # 0.1 + 0.2 style sums drift in floats; 1000 x 0.00000001 must be exactly 0.00001.
    store.insert([row(i, cost="0.00000001", at=T0 + timedelta(microseconds=i)) for i in range(1000)])
    rows = store.fetch(T0, T0 + timedelta(hours=1))
    assert sum((r.estimated_usd for r in rows), Decimal(0)) == Decimal("0.00001")
    assert summarise(rows, [])[0]["cost_usd"] == "0.00001"


def test_fetch_filters_by_time_window_and_key(store):
    store.insert([row(1, key="team-a"), row(2, key="team-b"), row(90, key="team-a")])
    assert [r.request_id for r in store.fetch(T0, T0 + timedelta(hours=1))] == ["req_1", "req_2"]
    assert [r.request_id for r in store.fetch(T0, T0 + timedelta(hours=2), "team-a")] == ["req_1", "req_90"]


def test_a_retried_batch_is_not_written_twice(store):
    batch = [row(1), row(2)]
    store.insert(batch)
    store.insert(batch)  # a retry after an error that hid the commit
    assert len(store.fetch(T0, T0 + timedelta(hours=1))) == 2


def test_the_ledger_refuses_updates_and_deletes(store, tmp_path):
    store.insert([row(1)])
    if isinstance(store, SqliteLedger):
        conn = sqlite3.connect(store.path)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE usage SET estimated_usd = '0'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM usage")
        conn.close()
    else:
        import psycopg

        with psycopg.connect(store._url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute("UPDATE usage SET estimated_usd = 0")
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute("DELETE FROM usage")
    assert len(store.fetch(T0, T0 + timedelta(hours=1))) == 1


def test_sqlite_and_postgres_keep_the_same_rows_for_the_same_traffic(tmp_path, postgres_server):
    traffic = [row(i, key=f"team-{i % 3}", cost=f"0.0{i:07d}", billed=f"0.0{i + 1:07d}" if i % 2 else None) for i in range(50)]
    lite = SqliteLedger(tmp_path / "a.sqlite3")
    pg = PostgresLedger(postgres_server.create_database(f"same_{uuid.uuid4().hex[:10]}"))
    try:
        lite.insert(traffic)
        pg.insert(traffic)
        window = (T0, T0 + timedelta(days=1))
        assert lite.fetch(*window) == pg.fetch(*window) == traffic
        assert summarise(lite.fetch(*window), ["key", "backend", "day"]) == summarise(pg.fetch(*window), ["key", "backend", "day"])
    finally:
        lite.close()
        pg.close()


def test_migrations_apply_once_however_often_the_gateway_starts(tmp_path, postgres_server):
    path = tmp_path / "usage.sqlite3"
    for _ in range(3):
        SqliteLedger(path).close()
    versions = [v for (v,) in sqlite3.connect(path).execute("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _ in migrations("sqlite")] == [1, 2]
    url = postgres_server.create_database(f"mig_{uuid.uuid4().hex[:10]}")
    # Replicas starting together: the advisory lock lets exactly one apply each version.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresLedger(url), range(4)))
    import psycopg

    with psycopg.connect(url) as conn:
        assert [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == [1, 2]
    for s in stores:
        s.close()


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        ([], [{"requests": 3, "images": 3, "cost_usd": "0.0154", "billed_usd": "0.0155"}]),
        (["key"], [{"key": "team-a", "requests": 2, "cost_usd": "0.0024", "billed_usd": None}, {"key": "team-b", "requests": 1, "cost_usd": "0.013", "billed_usd": "0.0155"}]),
        (["backend"], [{"backend": "fal", "requests": 2, "cost_usd": "0.0024", "billed_usd": None}, {"backend": "runflow", "requests": 1, "cost_usd": "0.013", "billed_usd": "0.0155"}]),
        (["day", "key"], [{"day": "2026-12-01", "key": "team-a", "requests": 1}, {"day": "2026-12-01", "key": "team-b", "requests": 1}, {"day": "2026-12-02", "key": "team-a", "requests": 1}]),
    ],
)
def test_usage_groups_add_up(group_by, expected):
    rows = [
        row(1, key="team-a", cost="0.0012"),
        row(2, key="team-b", backend="runflow", cost="0.013", billed="0.0155"),
        row(3, key="team-a", cost="0.0012", at=T0 + timedelta(days=1)),
    ]
    got = summarise(rows, group_by)
    assert len(got) == len(expected)
    for item, want in zip(got, expected, strict=True):
        assert {k: item[k] for k in want} == want


async def test_a_recorded_row_is_committed_before_record_returns_and_concurrent_ones_share_a_write(tmp_path):
    class Counting(SqliteLedger):
        writes = 0

        def insert(self, rows):
            self.writes += 1
            super().insert(rows)

    store = Counting(tmp_path / "usage.sqlite3")
    ledger = Ledger(store, interval_s=3600)  # no timed flush: every row is written by the record() that brought it
    ledger.start()
    assert await ledger.record(row(0)) is True
    assert len(SqliteLedger(tmp_path / "usage.sqlite3").fetch(T0, T0 + timedelta(hours=1))) == 1  # on disk, before any close
    assert all(await asyncio.gather(*(ledger.record(row(i, at=T0 + timedelta(microseconds=i))) for i in range(1, 250))))
    assert len(SqliteLedger(tmp_path / "usage.sqlite3").fetch(T0, T0 + timedelta(hours=1))) == 250
    assert store.writes < 250  # rows that waited for a running write went in together
    assert ledger.pending == 0
    await ledger.close()


async def test_writer_keeps_rows_when_the_store_fails_and_writes_them_later(tmp_path):
    class Flaky(SqliteLedger):
        failures = 2

        def insert(self, rows):
            if self.failures:
                self.failures -= 1
                raise OSError("disk unavailable")
            super().insert(rows)

    store = Flaky(tmp_path / "usage.sqlite3")
    ledger = Ledger(store, interval_s=0.01, max_waiting=5)
    ledger.start()
    for i in range(5):
        assert await ledger.record(row(i)) is False  # not written: kept for the background task
    assert ledger.pending == 5
    assert await ledger.record(row(5)) is False and ledger.lost == 1  # the bound: dropped, logged and counted, never an unbounded list
    for _ in range(200):
        if ledger.written == 5:
            break
        await asyncio.sleep(0.01)
    assert ledger.written == 5 and store.failures == 0
    assert [r.request_id for r in store.fetch(T0, T0 + timedelta(hours=1))] == [f"req_{i}" for i in range(5)]
    await ledger.close()
