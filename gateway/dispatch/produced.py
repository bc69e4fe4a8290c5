"""What a backend produced, by the images' own sizes, and what it said it billed.

A request for a shape may be served at any size within tolerance
(gateway.domain.native_sizes.acceptable), so the size predicted before the
attempt is not always the size made. The bill, the ledger's megapixels and
the answer's `size` follow the images as shaped, never the prediction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from decimal import Decimal

from gateway.dispatch.delivery import ShapedImage
from gateway.dispatch.fleet import Backend
from gateway.domain.job import ImageJob
from gateway.health.view import HealthView
from gateway.providers.base import FailureClass, ProviderError, ProviderResult
from gateway.routing.pricing import usd

MAX_BILLED_OVER_QUOTE = 100  # a provider's figure above this many quotes is a fault, not a price


def by_size(job: ImageJob, images: list[ShapedImage]) -> list[tuple[ImageJob, int]]:
    """(the job at one produced size, how many images have it), in first-seen order."""
    counts = Counter(img.size or (job.width, job.height) for img in images)
    return [(job if size == (job.width, job.height) else replace(job, width=size[0], height=size[1]), n) for size, n in counts.items()]


def bill_produced(backend: Backend, job: ImageJob, images: list[ShapedImage], view: HealthView | None = None) -> Decimal:
    """What the images cost at the sizes they were made (the sheet's rule per size)."""
    groups = by_size(job, images)
    if not groups:
        return backend.bill(job, 0, view)
    return sum((backend.bill(sized, n, view) for sized, n in groups), Decimal(0))


def produced_megapixels(job: ImageJob, images: list[ShapedImage]) -> Decimal:
    """Output megapixels of all the images, exact."""
    return sum((sized.megapixels * n for sized, n in by_size(job, images)), Decimal(0))


def produced_size(job: ImageJob, images: list[ShapedImage]) -> str:
    """The answer's top-level `size`: the first image's ("WxH")."""
    groups = by_size(job, images)
    return groups[0][0].size if groups else job.size


def trusted_billed(reported: Decimal | None, quoted: Decimal) -> Decimal | None:
    """A provider's own figure where it is a plausible price, else None (unknown):
    negative, not finite, or more than MAX_BILLED_OVER_QUOTE quotes is a fault.
    The gateway's figure is always the price sheet's; this one travels beside
    it for reconciliation (gateway/money/reconcile.py)."""
    if reported is None or not reported.is_finite() or reported < 0:
        return None
    if quoted > 0 and reported > quoted * MAX_BILLED_OVER_QUOTE:
        return None
    return usd(reported)


def failure_cost(backend: Backend, job: ImageJob, err: ProviderError, result: ProviderResult | None, view: HealthView | None = None) -> Decimal:
    """What a failed attempt surely cost. A delivery failure is billed for the
    images the provider made (as asked, when it returned none); any other
    failure the provider bills, for the job as asked; an unknown outcome is not
    surely billed (its caller counts it as possibly billed)."""
    if err.failure is FailureClass.UNKNOWN_OUTCOME:
        return Decimal(0)
    if err.failure is FailureClass.DELIVERY_FAILED:
        return backend.bill(job, len(result.images) if result is not None and result.images else job.n, view)
    return backend.bill(job, job.n, view) if err.billed else Decimal(0)
