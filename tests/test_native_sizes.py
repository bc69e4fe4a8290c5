"""Size intent and native sizes: which size each backend would produce. Pure."""

from __future__ import annotations

import pytest

from gateway.domain.capabilities import Capabilities, eligible
from gateway.domain.job import EXACT_SIZE, ImageJob, JobKind, SizeIntent
from gateway.domain.native_sizes import SizeTolerance, acceptable, as_served, native_size
from gateway.domain.sizes import resolve_size, size_intent
from gateway.providers.replicate import ReplicateAdapter

REPLICATE = ReplicateAdapter.capabilities_for({})
FREE = Capabilities()  # any size on the 16-pixel grid (fal, EmpirioLabs' shape)


def job_for(size: str | None = None, aspect_ratio: str | None = None, image_size: object = None) -> ImageJob:
    w, h = resolve_size(size, aspect_ratio, image_size)
    return ImageJob(kind=JobKind.GENERATE, prompt="p", width=w, height=h, size_intent=size_intent(size, aspect_ratio, image_size))


INTENTS = [
    # (size, aspect_ratio, image_size, intent)
    ("1344x768", None, None, EXACT_SIZE),
    (None, None, {"width": 1344, "height": 768}, EXACT_SIZE),
    (None, "16:9", None, SizeIntent(False, (16, 9))),
    ("auto", "4:3", None, SizeIntent(False, (4, 3))),
    (None, None, "landscape_16_9", SizeIntent(False, None)),
    ("auto", None, None, SizeIntent(False, None)),
    (None, None, None, SizeIntent(False, None)),
]


@pytest.mark.parametrize("size,aspect_ratio,image_size,intent", INTENTS)
def test_only_named_pixels_are_an_exact_size(size: str | None, aspect_ratio: str | None, image_size: object, intent: SizeIntent) -> None:
    assert size_intent(size, aspect_ratio, image_size) == intent


SERVED = [
    # (request, backend caps, size it would produce)
    (dict(aspect_ratio="16:9"), REPLICATE, (1365, 768)),
    (dict(aspect_ratio="9:16"), REPLICATE, (768, 1365)),
    (dict(aspect_ratio="4:3"), REPLICATE, (1183, 887)),
    (dict(aspect_ratio="3:4"), REPLICATE, (887, 1182)),
    (dict(aspect_ratio="3:2"), REPLICATE, (1254, 836)),
    (dict(aspect_ratio="5:4"), REPLICATE, (1145, 916)),
    (dict(aspect_ratio="21:9"), REPLICATE, (1563, 670)),  # within 1% of 21:9 itself, not of its grid rounding
    (dict(aspect_ratio="1:1"), REPLICATE, (1024, 1024)),
    (dict(aspect_ratio="16:9"), FREE, (1360, 768)),  # a free-size backend makes the resolved size
    (dict(size="1344x768"), REPLICATE, (1344, 768)),  # exact: never another size
    (dict(size="1360x768"), REPLICATE, (1360, 768)),
    (dict(image_size={"width": 1360, "height": 768}), REPLICATE, (1360, 768)),
    (dict(image_size="landscape_16_9"), REPLICATE, (1024, 576)),  # 0.59 MP: no 1 MP size is within 10%
    (dict(image_size="landscape_4_3"), REPLICATE, (1024, 768)),  # 4:3 at 1 MP is 33% more pixels
    (dict(aspect_ratio="2:1"), REPLICATE, (1440, 720)),  # no native 2:1: the resolved size again
    (dict(), REPLICATE, (1024, 1024)),
]


@pytest.mark.parametrize("request_fields,caps,produced", SERVED, ids=[f"{r}-{p[0]}x{p[1]}" for r, _, p in SERVED])
def test_each_backend_is_asked_for_the_size_it_would_produce(request_fields: dict, caps: Capabilities, produced: tuple[int, int]) -> None:
    job = job_for(**request_fields)
    assert native_size(job, caps) == produced
    served = as_served(job, caps)
    assert (served.width, served.height) == produced
    assert served.size_intent == job.size_intent and served.n == job.n


def test_a_served_native_size_is_eligible_even_off_the_16_pixel_grid() -> None:
    served = as_served(job_for(aspect_ratio="16:9"), REPLICATE)
    assert served.width % 16 and eligible(served, REPLICATE).ok


@pytest.mark.parametrize(
    "request_fields,reason",
    [
        (dict(size="1344x768"), "cannot produce exactly 1344x768"),
        (dict(aspect_ratio="2:1"), "cannot produce 1440x720 or a native size near it"),
    ],
)
def test_a_backend_with_no_size_near_the_request_says_so(request_fields: dict, reason: str) -> None:
    job = job_for(**request_fields)
    result = eligible(as_served(job, REPLICATE), REPLICATE)
    assert not result.ok and result.reason == reason and result.param == "size"


@pytest.mark.parametrize(
    "tolerance,produced",
    [
        (SizeTolerance(ratio=0.01, pixels=0.10), (1183, 887)),
        (SizeTolerance(ratio=0.0002, pixels=0.10), (1168, 880)),  # 1183x887 is 0.03% off 4:3...
        (SizeTolerance(ratio=0.0003, pixels=0.10), (1183, 887)),  # ...and 2.1% more pixels than 1168x880...
        (SizeTolerance(ratio=0.01, pixels=0.02), (1168, 880)),  # ...so a 2% pixel bound refuses it
        (SizeTolerance(ratio=0.01, pixels=0.03), (1183, 887)),
    ],
)
def test_the_tolerance_bounds_both_ratio_and_pixels(tolerance: SizeTolerance, produced: tuple[int, int]) -> None:
    assert native_size(job_for(aspect_ratio="4:3"), REPLICATE, tolerance) == produced


PRODUCED = [
    # (size, aspect_ratio, produced, tolerance, accepted)
    (None, "16:9", (1360, 768), SizeTolerance(), True),  # the resolved size itself
    (None, "16:9", (1365, 768), SizeTolerance(), True),  # Replicate's native size
    (None, "16:9", (1376, 768), SizeTolerance(), True),  # 0.8% off in ratio, 1.2% in pixels
    (None, "16:9", (1344, 768), SizeTolerance(), False),  # 1.6% off in ratio: past 1%
    (None, "16:9", (1024, 768), SizeTolerance(), False),  # 4:3 is another shape
    (None, "16:9", (1920, 1080), SizeTolerance(), False),  # twice the pixels
    (None, "16:9", (1365, 768), SizeTolerance(ratio=0, pixels=0), False),  # no tolerance: exact only
    (None, None, (1008, 1008), SizeTolerance(), True),  # no size at all: a square near 1 MP
    ("1024x1024", None, (1008, 1008), SizeTolerance(), False),  # exact pixels stay exact
    ("1024x1024", None, (1024, 1024), SizeTolerance(), True),
]


@pytest.mark.parametrize(("size", "aspect_ratio", "produced", "tolerance", "accepted"), PRODUCED)
def test_a_produced_size_is_accepted_only_within_tolerance_of_a_shape(size, aspect_ratio, produced, tolerance, accepted) -> None:
    assert acceptable(produced, job_for(size, aspect_ratio), tolerance) is accepted
