"""Live cost per image from a GPU price per hour (docs/local-backend.md#cost-per-image).

* marginal: what one more image costs when the GPU is paid for anyway,
  `usd_per_hour x busy seconds per image / 3600`.
* amortized: what an image really costs a rented GPU at the measured
  utilisation, `marginal / utilisation`.

The per-image figures in `/v1/info` are for the reference image the gateway's
`gpu_time` price sheet is written for (docs/providers/local.md#price): 1024x1024 at 4
steps, from measured speed. The gateway scales them by megapixels and steps.
A price of 0 means "not configured": every figure is then None and the gateway
falls back to its own sheet.
"""

from __future__ import annotations

from local_backend.schemas import CostFigures
from local_backend.speed import REFERENCE_STEPS, SpeedBook

REFERENCE_SIZE = (1024, 1024)
COST_BASIS = "1024x1024, 4 steps"


def marginal_usd(usd_per_hour: float, busy_seconds: float) -> float | None:
    """The price of `busy_seconds` of GPU time; None when no price is configured."""
    if usd_per_hour <= 0:
        return None
    return usd_per_hour * busy_seconds / 3600.0


def amortized_usd(marginal: float | None, utilization: float | None) -> float | None:
    if marginal is None or not utilization:
        return None
    return marginal / utilization


def request_cost(usd_per_hour: float, batch_seconds: float, images: int, batch_images: int) -> float | None:
    """This request's share of one batch's busy time, by its images."""
    if batch_images <= 0:
        return None
    return marginal_usd(usd_per_hour, batch_seconds * images / batch_images)


def cost_figures(usd_per_hour: float, speed: SpeedBook, utilization: float | None) -> CostFigures:
    seconds = speed.seconds_per_image(*REFERENCE_SIZE, REFERENCE_STEPS)
    marginal = None if seconds is None else marginal_usd(usd_per_hour, seconds)
    return CostFigures(
        marginal_usd_per_image=marginal,
        amortized_usd_per_image=amortized_usd(marginal, utilization),
        gpu_usd_per_hour=usd_per_hour,
        basis=COST_BASIS,
        utilization=None if utilization is None else round(utilization, 4),
    )
