"""The batch scheduler's pure policy: which lines the local GPU keeps, the rate it learns, the oracle, the margin."""

from __future__ import annotations

import math
import random
from decimal import Decimal

import pytest

from gateway.batches.schedule import OPTIMISM, LineCost, LocalRate, margin_s, oracle_usd, split


def lc(line: int, work: float, local: str | None, hosted: str | None, backend: str | None = "fal") -> LineCost:
    return LineCost(line, work, Decimal(local) if local is not None else None, Decimal(hosted) if hosted is not None else None, backend if hosted is not None else None)


# Saving per MP of work: line 0 0.005, line 1 0.004, line 2 0.003, line 3 0.002 (each 1 MP).
FOUR = [lc(0, 1.0, "0.001", "0.006"), lc(1, 1.0, "0.001", "0.005"), lc(2, 1.0, "0.001", "0.004"), lc(3, 1.0, "0.001", "0.003")]
SHUFFLED = [FOUR[2], FOUR[0], FOUR[3], FOUR[1]]


@pytest.mark.parametrize(
    ("pending", "seconds_left", "rate", "queued", "margin", "local", "spill"),
    [
        pytest.param(SHUFFLED, 100.0, 1.0, 0.0, 10.0, (0, 1, 2, 3), (), id="everything-fits-all-local-best-saving-first"),
        pytest.param(FOUR, 5.0, 1.0, 0.0, 10.0, (), (0, 1, 2, 3), id="nothing-fits-all-spill"),
        pytest.param(FOUR + [lc(4, 3.0, "0.001", None)], 5.0, 1.0, 0.0, 10.0, (4,), (0, 1, 2, 3), id="nothing-fits-hosted-less-line-stays-local"),
        pytest.param(SHUFFLED, 12.0, 1.0, 0.0, 10.0, (0, 1), (2, 3), id="partial-highest-saving-per-work-stay-in-order"),
        pytest.param([lc(0, 1.0, "0.001", "0.011"), lc(1, 2.0, "0.001", "0.011"), lc(2, 4.0, "0.001", "0.013")], 14.0, 1.0, 0.0, 10.0, (0, 1), (2,), id="partial-ranked-per-work-not-per-line"),
        pytest.param(
            [lc(0, 2.0, "0.001", "0.021"), lc(1, 2.0, "0.001", "0.011"), lc(2, 1.0, "0.001", "0.006")],
            13.0,
            1.0,
            0.0,
            10.0,
            (0, 2),
            (1,),
            id="partial-a-line-too-big-spills-a-smaller-one-after-it-fits",
        ),
        pytest.param([lc(0, 1.0, None, "0.006"), FOUR[1]], 1000.0, 1.0, 0.0, 10.0, (1,), (0,), id="local-less-line-spills-despite-room"),
        pytest.param([lc(0, 1.0, "0.006", "0.006"), lc(1, 1.0, "0.007", "0.006"), FOUR[2]], 1000.0, 1.0, 0.0, 10.0, (2,), (0, 1), id="no-saving-lines-spill-despite-room"),
        pytest.param(FOUR + [lc(4, 1.0, "0.001", None)], 1000.0, 0.0, 0.0, 10.0, (4,), (0, 1, 2, 3), id="rate-zero-spills-all-that-can"),
        pytest.param(FOUR, 1000.0, -1.0, 0.0, 10.0, (), (0, 1, 2, 3), id="negative-rate-spills-all"),
        pytest.param(FOUR, 14.0, 1.0, 0.0, 10.0, (0, 1, 2, 3), (), id="queued-none-four-fit"),
        pytest.param(FOUR, 14.0, 1.0, 1.5, 10.0, (0, 1), (2, 3), id="local-queued-reduces-capacity"),
        pytest.param(FOUR, 14.0, 1.0, 0.0, 12.0, (0, 1), (2, 3), id="margin-reduces-capacity"),
        pytest.param(FOUR, 14.0, 0.5, 0.0, 10.0, (0, 1), (2, 3), id="rate-scales-capacity"),
        pytest.param([*FOUR, lc(4, 3.0, "0.001", None)], 14.0, 1.0, 0.0, 10.0, (4, 0), (1, 2, 3), id="hosted-less-line-first-and-counts-against-capacity"),
        pytest.param([lc(2, 1.0, "0.001", "0.004"), lc(0, 1.0, "0.001", "0.004"), lc(1, 1.0, "0.001", "0.004")], 12.0, 1.0, 0.0, 10.0, (0, 1), (2,), id="equal-saving-ties-by-line-index"),
        pytest.param([lc(0, 0.0, "0.001", "0.002"), FOUR[1]], 10.0, 1.0, 0.0, 10.0, (0,), (1,), id="line-of-no-work-stays-local-without-capacity"),
    ],
)
def test_split_rules(pending: list[LineCost], seconds_left: float, rate: float, queued: float, margin: float, local: tuple[int, ...], spill: tuple[int, ...]) -> None:
    got = split(pending, seconds_left=seconds_left, rate_mp_s=rate, local_queued_mp=queued, margin_s=margin)
    assert (got.local, got.spill) == (local, spill)


def test_split_is_deterministic_whatever_the_order_of_pending() -> None:
    rng = random.Random(3)
    lines = [lc(i, rng.choice([0.26, 1.05, 2.36]), "0.0004", rng.choice(["0.0013", "0.0052", "0.0118"])) for i in range(200)]
    first = split(lines, seconds_left=100.0, rate_mp_s=1.0, local_queued_mp=0.0, margin_s=10.0)
    rng.shuffle(lines)
    again = split(lines, seconds_left=100.0, rate_mp_s=1.0, local_queued_mp=0.0, margin_s=10.0)
    assert first == again
    assert first.local and first.spill  # the case is partial, so the order mattered


MIXED = [lc(0, 1.0, "0.001", "0.006"), lc(1, 2.0, "0.002", "0.004"), lc(2, 1.0, None, "0.007"), lc(3, 1.0, "0.005", "0.005"), lc(4, 1.0, "0.003", None), lc(5, 1.0, None, None)]


@pytest.mark.parametrize(
    ("seconds_left", "rate", "queued", "expected_usd"),
    [
        pytest.param(100.0, 1.0, 0.0, "0.018", id="all-that-save-local"),  # 0.001 + 0.002 + 0.003 local; 0.007 + 0.005 hosted; line 5 nothing
        pytest.param(12.0, 1.0, 0.0, "0.020", id="partial"),  # room 2: line 4 (forced) and line 0 local; line 1 hosted at 0.004
        pytest.param(10.0, 1.0, 0.0, "0.025", id="none-fit"),  # line 4 forced: 0.003; the rest hosted: 0.006 + 0.004 + 0.007 + 0.005
        pytest.param(100.0, 0.0, 0.0, "0.025", id="rate-zero"),
        pytest.param(100.0, 1.0, 88.0, "0.020", id="queued-work-leaves-room-for-two"),
    ],
)
def test_forecast_usd_is_local_prices_of_local_lines_plus_hosted_prices_of_spilled(seconds_left: float, rate: float, queued: float, expected_usd: str) -> None:
    got = split(MIXED, seconds_left=seconds_left, rate_mp_s=rate, local_queued_mp=queued, margin_s=10.0)
    by_line = {c.line: c for c in MIXED}
    summed = sum((by_line[i].local_usd or Decimal(0) for i in got.local), Decimal(0)) + sum((by_line[i].hosted_usd or Decimal(0) for i in got.spill), Decimal(0))
    assert got.forecast_usd == summed == Decimal(expected_usd)


@pytest.mark.parametrize(
    ("pending", "rate", "queued", "expected_s"),
    [
        pytest.param(FOUR, 0.5, 0.0, 8.0, id="planned-work-over-rate"),  # 4 MP at 0.5 MP/s
        pytest.param(FOUR, 0.5, 1.0, 10.0, id="queued-work-counts"),  # (1 + 4) / 0.5
        pytest.param([], 0.5, 1.0, 2.0, id="queued-only"),
        pytest.param([], 0.5, 0.0, 0.0, id="nothing-planned-is-zero"),
        pytest.param([lc(0, 1.0, None, "0.006")], 0.5, 0.0, 0.0, id="all-spilled-is-zero"),
        pytest.param([lc(0, 1.0, "0.001", None)], 0.0, 0.0, math.inf, id="hosted-less-work-without-a-rate-never-finishes"),
    ],
)
def test_forecast_finish_is_queued_plus_planned_work_over_rate(pending: list[LineCost], rate: float, queued: float, expected_s: float) -> None:
    got = split(pending, seconds_left=1000.0, rate_mp_s=rate, local_queued_mp=queued, margin_s=10.0)
    assert got.forecast_finish_s == pytest.approx(expected_s)


# ---- LocalRate ------------------------------------------------------------------------------


def optimistic(rate: float, lines: int) -> float:
    return rate * (1 + OPTIMISM / math.sqrt(lines))


def test_local_rate_is_the_prior_until_three_lines_finished() -> None:
    rate = LocalRate(2.0)
    rate.busy(0.0, True)
    rate.completed(1.0, 4.0)
    rate.completed(1.0, 8.0)
    assert rate.mp_per_s == 2.0
    rate.completed(1.0, 10.0)
    assert rate.mp_per_s == pytest.approx(optimistic(3.0 / 10.0, 3))


def test_local_rate_is_the_prior_until_two_seconds_busy() -> None:
    rate = LocalRate(2.0)
    rate.busy(0.0, True)
    for at in (0.5, 1.0, 1.5):
        rate.completed(0.1, at)
    assert rate.mp_per_s == 2.0
    rate.completed(0.1, 2.0)
    assert rate.mp_per_s == pytest.approx(optimistic(0.4 / 2.0, 4))


def test_local_rate_does_not_count_idle_time() -> None:
    rate = LocalRate(9.0)
    rate.busy(0.0, True)
    rate.completed(1.0, 2.0)
    rate.completed(1.0, 5.0)
    rate.busy(5.0, False)
    rate.busy(50.0, False)  # ticks while idle
    rate.busy(100.0, True)
    rate.completed(1.0, 105.0)
    assert rate.mp_per_s == pytest.approx(optimistic(3.0 / 10.0, 3))  # 10 s busy, not 105


def test_local_rate_does_not_count_the_running_line_until_it_finishes() -> None:
    rate = LocalRate(9.0)
    rate.busy(0.0, True)
    for at in (2.0, 4.0, 6.0):
        rate.completed(1.0, at)
    rate.busy(16.0, True)  # a long line has been running 10 s
    assert rate.mp_per_s == pytest.approx(optimistic(0.5, 3))
    assert rate.partial_mp == pytest.approx(10.0 * optimistic(0.5, 3))
    rate.completed(5.0, 16.0)
    assert rate.mp_per_s == pytest.approx(optimistic(8.0 / 16.0, 4))
    assert rate.partial_mp == 0.0


def test_local_rate_learns_a_rate_below_its_prior() -> None:
    rate = LocalRate(0.13)
    rate.busy(0.0, True)
    for i in range(1, 401):
        rate.completed(1.0, 10.0 * i)  # 0.1 MP/s
    assert rate.mp_per_s == pytest.approx(optimistic(0.1, 400))
    assert rate.mp_per_s < 0.102


# ---- the oracle and the margin ------------------------------------------------------------------

# Line 0: 0.005 saved per MP; line 1: 0.002 per MP; line 2 has no hosted backend; line 3 no local; line 4 saves nothing.
ORACLE_LINES = [lc(0, 2.0, "0.001", "0.011"), lc(1, 4.0, "0.002", "0.010"), lc(2, 1.0, "0.003", None), lc(3, 1.0, None, "0.020"), lc(4, 1.0, "0.010", "0.010")]


@pytest.mark.parametrize(
    ("window_s", "rate", "expected_usd"),
    [
        # capacity 5 MP: line 2 takes 1, line 0 2, half of line 1 local: 0.003 + 0.001 + (0.002 + 0.010) / 2 + 0.020 + 0.010
        pytest.param(10.0, 0.5, "0.040", id="fractional-boundary-line"),
        pytest.param(1000.0, 1.0, "0.036", id="all-savers-local"),  # 0.001 + 0.002 + 0.003 + 0.020 + 0.010
        pytest.param(0.0, 1.0, "0.054", id="no-capacity-all-hosted-but-the-hosted-less"),  # 0.011 + 0.010 + 0.003 + 0.020 + 0.010
        pytest.param(3.0, 1.0, "0.044", id="capacity-ends-exactly-after-line-0"),  # 0.003 + 0.001 + 0.010 + 0.020 + 0.010
    ],
)
def test_oracle_usd_fills_capacity_by_saving_per_work(window_s: float, rate: float, expected_usd: str) -> None:
    assert oracle_usd(ORACLE_LINES, window_s=window_s, rate_mp_s=rate) == Decimal(expected_usd)


def test_oracle_is_never_above_a_split_of_the_same_capacity() -> None:
    rng = random.Random(5)
    lines = [lc(i, rng.choice([0.26, 1.05, 2.36, 4.72]), "0.0004", rng.choice(["0.0013", "0.0052", "0.0118", "0.0236"])) for i in range(300)]
    for seconds in (0.0, 50.0, 200.0, 400.0, 1000.0):
        plan = split(lines, seconds_left=seconds, rate_mp_s=1.0, local_queued_mp=0.0, margin_s=0.0)
        assert oracle_usd(lines, window_s=seconds, rate_mp_s=1.0) <= plan.forecast_usd


@pytest.mark.parametrize(
    ("window_s", "expected_s"),
    [
        pytest.param(300.0, 60.0, id="5-min"),
        pytest.param(3600.0, 60.0, id="1-h"),
        pytest.param(6 * 3600.0, 60.0, id="6-h"),
        pytest.param(24 * 3600.0, 60.0, id="24-h"),
        pytest.param(120.0, 24.0, id="2-min-keeps-four-fifths-for-work"),
        pytest.param(0.0, 0.0, id="no-window"),
    ],
)
def test_margin_s(window_s: float, expected_s: float) -> None:
    assert margin_s(window_s) == pytest.approx(expected_s)
