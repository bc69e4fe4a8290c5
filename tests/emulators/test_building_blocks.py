"""Pure pieces: knob merging, latency sampling, job phases, image padding and cache."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from tests.emulators.images import ImageStore
from tests.emulators.jobs import JobBook, Spec
from tests.emulators.knobs import EmulatorKnobs, JobTiming, Latency


def test_merge_is_nested_and_leaves_the_original_alone():
    base = EmulatorKnobs()
    merged = base.merge({"latency": {"kind": "uniform", "low_ms": 5, "high_ms": 10}, "faults": {"queue": ["reset"]}})
    assert merged.latency.kind == "uniform" and merged.latency.low_ms == 5.0 and merged.faults.queue == ["reset"]
    assert base.latency.kind == "fixed" and base.faults.queue == []


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"nope": 1}, "unknown knob 'nope'"),
        ({"latency": {"ms": "fast"}}, "latency.ms: expected a number"),
        ({"latency": {"kind": "gaussian"}}, "latency.kind"),
        ({"local": {"ready": 1}}, "local.ready: expected true or false"),
        ({"local": {"max_concurrency": 0}}, "max_concurrency"),
        ({"faults": {"server_error_status": 404}}, "5xx"),
        ({"cancel_spelling": "cancel"}, "cancel_spelling"),
        ({"seed": 1.5}, "seed: expected an integer"),
        ({"faults": 3}, "faults: expected an object"),
    ],
)
def test_merge_refuses_bad_values(patch, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        EmulatorKnobs().merge(patch)


@pytest.mark.parametrize(
    ("latency", "low", "high"),
    [
        (Latency(kind="fixed", ms=20), 0.02, 0.02),
        (Latency(kind="uniform", low_ms=10, high_ms=30), 0.01, 0.03),
        (Latency(kind="lognormal", median_ms=50, sigma=0.5, max_ms=80), 0.0, 0.08),
    ],
)
def test_latency_samples_stay_in_their_distribution(latency, low, high):
    rng = random.Random(3)
    samples = [latency.sample_s(rng) for _ in range(500)]
    assert all(low - 1e-9 <= s <= high + 1e-9 for s in samples)
    if latency.kind == "lognormal":
        assert sorted(samples)[250] == pytest.approx(0.05, rel=0.2)


@pytest.mark.parametrize(
    ("offset", "phase"),
    [(0.05, "queued"), (0.15, "dispatching"), (0.25, "running"), (0.35, "succeeded")],
)
def test_job_phase_follows_the_clock(offset, phase):
    job = JobBook().create(Spec("p", 64, 64), {}, JobTiming(queue_ms=100, dispatch_ms=100, run_ms=100))
    assert job.phase(job.created + offset) == phase


def test_job_book_forgets_the_oldest_beyond_its_bound():
    book = JobBook(max_jobs=3)
    jobs = [book.create(Spec("p", 64, 64), {}, JobTiming()) for _ in range(4)]
    assert book.get(jobs[0].id) is None and book.get(jobs[3].id) is jobs[3] and len(book) == 3


@pytest.mark.parametrize("fmt", ["png", "jpeg", "jpg", "webp"])
@pytest.mark.parametrize("pad", [0, 300_000])
def test_rendered_images_decode_and_padding_reaches_the_target(fmt, pad):
    image = ImageStore("fal").render(320, 240, fmt, "a prompt", "label", pad)
    assert len(image.data) >= pad
    with Image.open(io.BytesIO(image.data)) as decoded:
        decoded.load()
        assert decoded.size == (320, 240)
    assert image.content_type == ("image/jpeg" if fmt in ("jpeg", "jpg") else f"image/{fmt}")


def test_image_cache_hits_and_is_bounded():
    store = ImageStore("local", max_entries=2)
    first = store.render(64, 64, "png", "a")
    assert store.render(64, 64, "png", "a") is first and store.renders == 1
    store.render(64, 64, "png", "b")
    store.render(64, 64, "png", "c")
    assert store.get(first.id) is None and store.renders == 3


def test_image_cache_is_bounded_by_bytes_too():
    store = ImageStore("local", max_entries=100, max_bytes=250_000)
    kept = [store.render(64, 64, "png", str(i), "", 100_000) for i in range(3)]
    assert store.get(kept[0].id) is None and store.get(kept[2].id) is kept[2]


def test_fal_start_deadline_aborts_a_job_that_never_started():
    job = JobBook().create(Spec("p", 64, 64), {}, JobTiming(queue_ms=500), stuck=False)
    job.start_deadline_s = 0.2
    assert job.phase(job.created + 0.1) == "queued"
    assert job.seconds_until_done(job.created) == pytest.approx(0.2)
    assert job.phase(job.created + 0.3) == "aborted"
    assert job.phase(job.created + 1.0) == "aborted"  # frozen, even past the queue time


def test_stored_input_echo_cuts_long_strings():
    uri = "data:image/png;base64," + "A" * 10_000
    job = JobBook().create(Spec("p", 64, 64), {"prompt": "short", "image_urls": [uri]}, JobTiming())
    assert job.input["prompt"] == "short"
    assert len(job.input["image_urls"][0]) < 200 and "10022 chars" in job.input["image_urls"][0]


@pytest.mark.parametrize("provider", ["fal", "replicate", "runflow", "empiriolabs", "local"])
def test_realistic_knobs_are_valid_and_not_instant(provider):
    knobs = EmulatorKnobs.realistic(provider)
    knobs.validate()
    assert knobs.job.queue_ms + knobs.job.run_ms > 0 and knobs.latency.kind == "lognormal"
