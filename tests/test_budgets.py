"""Budgets: windows and their resets, exact units, and reservations that can
never take a window over its limit, in memory and on a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway.money.budgets import BudgetUnavailable, MemoryBudgets, RedisBudgets, from_units, to_units, windows_at
from gateway.routing.plan import Plan


@pytest.mark.parametrize(
    ("now", "window", "period", "resets"),
    [
        (datetime(2026, 12, 1, 10, 30, tzinfo=UTC), "day", "2026-12-01", datetime(2026, 12, 2, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), "day", "2026-12-31", datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 12, 15, tzinfo=UTC), "month", "2026-12", datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 2, 28, 12, tzinfo=UTC), "month", "2026-02", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_windows_are_utc_days_and_months(now, window, period, resets):
    (w,) = windows_at([(window, Decimal(5))], now)
    assert (w.period, w.resets_at, w.limit_units) == (period, resets, 500_000_000)


@pytest.mark.parametrize(("usd", "units"), [("0.05", 5_000_000), ("0.00000001", 1), ("0.000000001", 1), ("0", 0), ("0.01404858", 1_404_858)])
def test_units_are_exact_and_round_up(usd, units):
    assert to_units(Decimal(usd)) == units
    if units:
        assert from_units(units) >= Decimal(usd)


@pytest.fixture(params=["memory", "redis"])
async def budgets(request):
    if request.param == "memory":
        yield MemoryBudgets()
        return
    server = request.getfixturevalue("redis_server")
    store = RedisBudgets(server.url, namespace=f"test-{uuid.uuid4().hex[:10]}")
    yield store
    await store.close()


NOW = datetime(2026, 12, 1, 10, tzinfo=UTC)


async def test_a_reservation_that_fits_is_taken_and_one_that_does_not_is_refused_whole(budgets):
    windows = windows_at([("day", Decimal("0.05")), ("month", Decimal("0.08"))], NOW)
    assert await budgets.reserve("k", windows, to_units(Decimal("0.04"))) is None
    refused = await budgets.reserve("k", windows, to_units(Decimal("0.02")))
    assert refused is not None and refused.name == "day"
    assert await budgets.spent("k", windows) == [4_000_000, 4_000_000]  # the refusal added to neither window
    await budgets.settle("k", windows, -to_units(Decimal("0.03")))  # it cost 0.01 in the end
    assert await budgets.spent("k", windows) == [1_000_000, 1_000_000]


async def test_the_month_window_refuses_when_the_day_still_has_room(budgets):
    windows = windows_at([("day", Decimal(1)), ("month", Decimal("0.03"))], NOW)
    assert await budgets.reserve("k", windows, 2_000_000) is None
    refused = await budgets.reserve("k", windows, 2_000_000)
    assert refused is not None and refused.name == "month"


async def test_concurrent_reservations_never_exceed_the_limit(budgets):
    windows = windows_at([("day", Decimal("0.05"))], NOW)
    unit = to_units(Decimal("0.00131072"))
    results = await asyncio.gather(*(budgets.reserve("k", windows, unit) for _ in range(60)))
    taken = sum(1 for r in results if r is None)
    assert taken == to_units(Decimal("0.05")) // unit  # 38: exactly as many as fit
    assert (await budgets.spent("k", windows))[0] <= to_units(Decimal("0.05"))


async def test_keys_have_budgets_of_their_own(budgets):
    windows = windows_at([("day", Decimal("0.01"))], NOW)
    assert await budgets.reserve("a", windows, 1_000_000) is None
    assert await budgets.reserve("b", windows, 1_000_000) is None
    assert await budgets.reserve("a", windows, 1) is not None


async def test_a_dead_redis_is_reported_not_ignored():
    from tests.redis_server import free_port

    store = RedisBudgets(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    with pytest.raises(BudgetUnavailable):
        await store.reserve("k", windows_at([("day", Decimal(1))], NOW), 1)
    await store.close()


def test_the_worst_case_is_the_dearest_quote_in_the_plan():
    from gateway.domain.capabilities import Eligibility
    from gateway.health.view import HealthView
    from gateway.money.tab import worst_case
    from gateway.routing.plan import Candidate
    from gateway.routing.pricing import Quote

    def cand(name: str, usd: str) -> Candidate:
        return Candidate(name, Eligibility(True), Quote(Decimal(usd), "per_image", ""), HealthView())

    plan = Plan((cand("local", "0.0004"), cand("runflow", "0.014"), cand("fal", "0.0052")), ())
    assert worst_case(plan) == Decimal("0.014")
    assert worst_case(Plan((), ())) == Decimal(0)


@pytest.mark.parametrize(
    ("spent", "taken", "refused"),
    [
        (0, 1_400_000, None),  # the whole plan fits
        (700_000, 500_000, None),  # only the cheaper worst cases fit: the largest of them
        (1_900_000, 40_000, None),
        (1_990_000, None, "day"),  # not even the cheapest
    ],
)
async def test_the_largest_worst_case_that_fits_is_reserved(budgets, spent, taken, refused):
    windows = windows_at([("day", Decimal("0.02")), ("month", Decimal(1))], NOW)
    if spent:
        assert await budgets.reserve("k", windows, spent) is None
    got, window = await budgets.reserve_largest("k", windows, [1_400_000, 500_000, 40_000])
    assert got == taken and (window.name if window else None) == refused
    assert (await budgets.spent("k", windows))[0] == spent + (taken or 0)


def test_a_tight_budget_keeps_the_backends_it_can_pay_for():
    from gateway.domain.capabilities import Eligibility
    from gateway.health.view import HealthView
    from gateway.money.tab import within, worst_cases
    from gateway.routing.plan import Candidate
    from gateway.routing.pricing import Quote

    def cand(name: str, usd: str) -> Candidate:
        return Candidate(name, Eligibility(True), Quote(Decimal(usd), "per_image", ""), HealthView())

    plan = Plan((cand("runflow", "0.014"), cand("local", "0.0004"), cand("fal", "0.0052")), ())  # a caller's order
    assert worst_cases(plan) == [Decimal("0.014"), Decimal("0.0052"), Decimal("0.0004")]
    trimmed = within(plan, Decimal("0.0052"))
    assert [c.name for c in trimmed.attempts] == ["local", "fal"]
    assert dict(trimmed.skipped)["runflow"].startswith("quoted $0.014")
    assert within(plan, Decimal("0.014")) is plan
