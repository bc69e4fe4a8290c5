"""Sizes, batch keys and caps: which requests may share a pipeline call."""

from __future__ import annotations

import pytest

from local_backend.buckets import (
    DEFAULT_BUCKETS,
    OTHER_BUCKET,
    BatchKey,
    SizeLimits,
    batch_cap,
    bucket_label,
    parse_size,
    parse_sizes,
    reference_digest,
    size_problem,
)


@pytest.mark.parametrize(
    ("width", "height", "limits", "problem"),
    [
        (1024, 1024, SizeLimits(), None),
        (64, 2048, SizeLimits(), None),
        (1360, 768, SizeLimits(), None),  # not a bucket, still served exactly
        (1000, 1024, SizeLimits(), "multiples of 16"),
        (48, 64, SizeLimits(), "64 to 2048"),
        (2064, 1024, SizeLimits(), "64 to 2048"),
        (2048, 2048, SizeLimits(max_pixels=1024 * 1024), "at most 1,048,576 pixels"),
        (1024, 1024, SizeLimits(max_pixels=1024 * 1024), None),
    ],
)
def test_size_problem_names_the_limit(width: int, height: int, limits: SizeLimits, problem: str | None) -> None:
    found = size_problem(width, height, limits)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("width", "height", "max_images", "max_pixels", "cap"),
    [
        (1024, 1024, 8, 4 * 1024 * 1024, 4),  # about 4 images at 1 MP
        (512, 512, 8, 4 * 1024 * 1024, 8),  # 16 would fit, the image cap wins
        (2048, 2048, 8, 4 * 1024 * 1024, 1),
        (2048, 2048, 8, 1024 * 1024, 1),  # never below one
        (64, 64, 3, 4 * 1024 * 1024, 3),
    ],
)
def test_batch_cap_depends_on_pixels(width: int, height: int, max_images: int, max_pixels: int, cap: int) -> None:
    assert batch_cap(width, height, max_images=max_images, max_pixels=max_pixels) == cap


def test_batch_keys_differ_by_size_steps_and_references() -> None:
    base = BatchKey(512, 512, 4, None)
    assert base == BatchKey(512, 512, 4, None)
    assert base != BatchKey(512, 768, 4, None)
    assert base != BatchKey(512, 512, 8, None)
    assert base != BatchKey(512, 512, 4, reference_digest([b"ref"]))


def test_reference_digest_depends_on_content_and_order() -> None:
    assert reference_digest([]) is None
    assert reference_digest([b"a", b"b"]) == reference_digest([b"a", b"b"])
    assert reference_digest([b"a", b"b"]) != reference_digest([b"b", b"a"])
    assert reference_digest([b"ab"]) != reference_digest([b"a", b"b"])  # boundaries count


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024x768", (1024, 768)), (" 512X512 ", (512, 512)), ("square_hd", (1024, 1024)), ("landscape_16_9", (1024, 576))],
)
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="1024x768"):
        parse_size("big")


def test_parse_sizes_accepts_strings_and_pairs() -> None:
    assert parse_sizes("64x64, 128x128") == ((64, 64), (128, 128))
    assert parse_sizes([[64, 64], "square"]) == ((64, 64), (512, 512))


def test_default_buckets_are_fals_six_presets() -> None:
    assert len(DEFAULT_BUCKETS) == 6
    assert (1024, 1024) in DEFAULT_BUCKETS and (576, 1024) in DEFAULT_BUCKETS
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in DEFAULT_BUCKETS)


def test_bucket_label_is_bounded() -> None:
    assert bucket_label(1024, 768, DEFAULT_BUCKETS) == "1024x768"
    assert bucket_label(1360, 768, DEFAULT_BUCKETS) == OTHER_BUCKET
