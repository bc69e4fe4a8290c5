"""Measured speed, utilisation, and the cost figures derived from them."""

from __future__ import annotations

import pytest

from local_backend.cost import COST_BASIS, amortized_usd, cost_figures, marginal_usd, request_cost
from local_backend.speed import MAX_OTHER_SIZES, SpeedBook, UtilizationWindow


def test_speed_is_per_image_normalised_to_four_steps() -> None:
    book = SpeedBook()
    book.record(1024, 1024, steps=8, images=2, seconds=2.0)  # 1 s/img at 8 steps -> 0.5 at 4
    assert book.seconds_per_image(1024, 1024) == pytest.approx(0.5)
    assert book.seconds_per_image(1024, 1024, steps=2) == pytest.approx(0.25)
    assert book.by_size() == {"1024x1024": 0.5}


def test_speed_is_a_moving_average() -> None:
    book = SpeedBook()
    book.record(512, 512, 4, 1, 1.0)
    book.record(512, 512, 4, 1, 2.0)
    assert 1.0 < book.seconds_per_image(512, 512) < 2.0


def test_unmeasured_size_scales_from_the_nearest_by_pixels() -> None:
    book = SpeedBook()
    book.record(512, 512, 4, 1, 0.2)
    book.record(1024, 1024, 4, 1, 0.6)
    assert book.seconds_per_image(1024, 768) == pytest.approx(0.6 * 0.75)
    assert book.seconds_per_image(256, 256) == pytest.approx(0.2 / 4)


def test_nothing_measured_means_no_estimate() -> None:
    assert SpeedBook().seconds_per_image(512, 512) is None


def test_other_sizes_are_bounded_but_buckets_kept() -> None:
    book = SpeedBook(buckets=[(1024, 1024)])
    book.record(1024, 1024, 4, 1, 0.5)
    for n in range(MAX_OTHER_SIZES + 5):
        book.record(64, 64 + 16 * n, 4, 1, 0.01)
    sizes = book.by_size()
    assert "1024x1024" in sizes
    assert len(sizes) == MAX_OTHER_SIZES + 1
    assert "64x64" not in sizes  # the oldest other size went first


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_utilization_is_busy_over_wall_time_in_the_window() -> None:
    clock = Clock()
    window = UtilizationWindow(60.0, clock=clock)
    assert window.utilization() is None  # not serving yet
    window.start()
    clock.now += 10
    window.add(2.5)
    assert window.utilization() == pytest.approx(0.25)
    clock.now += 100  # the busy time left the window
    assert window.utilization() == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("usd_per_hour", "seconds", "expected"),
    [(2.5, 0.57, 2.5 * 0.57 / 3600), (0.0, 0.57, None)],
)
def test_marginal_cost(usd_per_hour: float, seconds: float, expected: float | None) -> None:
    assert marginal_usd(usd_per_hour, seconds) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("marginal", "utilization", "expected"),
    [(0.0004, 0.5, 0.0008), (0.0004, 0.0, None), (0.0004, None, None), (None, 0.5, None)],
)
def test_amortized_cost(marginal: float | None, utilization: float | None, expected: float | None) -> None:
    assert amortized_usd(marginal, utilization) == (None if expected is None else pytest.approx(expected))


def test_request_cost_is_its_share_of_the_batch() -> None:
    assert request_cost(3.6, batch_seconds=4.0, images=1, batch_images=4) == pytest.approx(0.001)
    assert request_cost(0.0, 4.0, 1, 4) is None


def test_cost_figures_are_for_the_reference_image() -> None:
    book = SpeedBook()
    book.record(1024, 1024, 4, 1, 0.57)
    figures = cost_figures(2.5, book, utilization=0.3)
    assert figures.marginal_usd_per_image == pytest.approx(2.5 * 0.57 / 3600)
    assert figures.amortized_usd_per_image == pytest.approx(2.5 * 0.57 / 3600 / 0.3)
    assert figures.basis == COST_BASIS and figures.utilization == 0.3
    unpriced = cost_figures(0.0, book, utilization=0.3)
    assert unpriced.marginal_usd_per_image is None and unpriced.amortized_usd_per_image is None
