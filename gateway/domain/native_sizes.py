"""Which size a backend would produce for a job. Pure.

A job whose size is exact is served at that size or not at all. A job that
asked for a shape (an aspect ratio, a preset, `auto`) may be served at a
backend's own native size when that size is near the resolved one: its
ratio within `ratio` (relative) of the ratio the caller asked for, and its
pixel count within `pixels` (relative) of the resolved size's. Replicate's
klein, for one, makes 1365x768 for 16:9 and nothing on the 16-pixel grid
(docs/providers/replicate.md#sizes), so without this a 16:9 request could
never reach the cheapest backend. Pricing then quotes the job at the size
the backend would produce, so the quote is what is billed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import ImageJob


@dataclass(frozen=True, slots=True)
class SizeTolerance:
    """How far a native size may be from the resolved one (relative errors)."""

    ratio: float = 0.01
    pixels: float = 0.10

    def describe(self) -> str:
        return f"{self.ratio:.0%} in aspect ratio and {self.pixels:.0%} in pixels"


DEFAULT_TOLERANCE = SizeTolerance()


def target_ratio(job: ImageJob) -> float:
    """The ratio the caller asked for: their `aspect_ratio`, else the resolved size's."""
    if job.size_intent.ratio is not None:
        num, den = job.size_intent.ratio
        return num / den
    return job.width / job.height


def near(size: tuple[int, int], job: ImageJob, tolerance: SizeTolerance) -> bool:
    """Is `size` within tolerance of what the job asked for?"""
    w, h = size
    ratio = target_ratio(job)
    return abs(w / h - ratio) / ratio <= tolerance.ratio and abs(w * h - job.pixels) / job.pixels <= tolerance.pixels


def acceptable(size: tuple[int, int], job: ImageJob, tolerance: SizeTolerance = DEFAULT_TOLERANCE) -> bool:
    """May an image of `size` be handed over for `job`? An exact job wants its
    pixels and nothing else; a job that asked for a shape takes any size
    within tolerance of it. Providers round to their own grids (one made
    1360x768 where 1365x768 was predicted for 16:9): that is still the shape
    asked for, and buying it again elsewhere would bill the caller twice."""
    if size == (job.width, job.height):
        return True
    return not job.size_intent.exact and size[0] > 0 and size[1] > 0 and near(size, job, tolerance)


def native_size(job: ImageJob, caps: Capabilities, tolerance: SizeTolerance = DEFAULT_TOLERANCE) -> tuple[int, int]:
    """The (width, height) this backend would produce for `job`.

    The job's own size unless the job is flexible, the backend makes only a
    fixed set of sizes, and the job's size is not one of them; then the
    nearest of those within tolerance (closest ratio, then closest pixel
    count), or the job's own size again when none is near (and eligibility
    then says no)."""
    asked = (job.width, job.height)
    sizes = caps.exact_sizes
    if job.size_intent.exact or sizes is None or asked in sizes:
        return asked
    ratio = target_ratio(job)
    fits = [s for s in sizes if near(s, job, tolerance)]
    if not fits:
        return asked
    return min(fits, key=lambda s: (abs(s[0] / s[1] - ratio), abs(s[0] * s[1] - job.pixels), s))


def as_served(job: ImageJob, caps: Capabilities, tolerance: SizeTolerance = DEFAULT_TOLERANCE) -> ImageJob:
    """The job at the size this backend would produce (the job itself if unchanged)."""
    w, h = native_size(job, caps, tolerance)
    return job if (w, h) == (job.width, job.height) else replace(job, width=w, height=h)
