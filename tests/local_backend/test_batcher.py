"""The batcher with a fake generator: grouping, order, backpressure, deadlines, OOM."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from local_backend.batcher import (
    Batcher,
    DeadlineExpired,
    GenerationFailed,
    NotReady,
    OutOfMemory,
    QueueFull,
    image_seeds,
)
from local_backend.buckets import reference_digest
from tests.local_backend.conftest import FakeGenerator, FakeOOM, make_item, make_settings, seed_color, until


@pytest.fixture
async def start() -> AsyncIterator[Any]:
    """start(generator, **settings) -> a ready Batcher, stopped after the test."""
    started: list[tuple[Batcher, FakeGenerator]] = []

    async def factory(generator: FakeGenerator, checker: Any = None, **overrides: Any) -> Batcher:
        batcher = Batcher(make_settings(**overrides), oom_errors=(FakeOOM,))
        batcher.attach(generator, checker)
        batcher.start()
        batcher.mark_ready()
        started.append((batcher, generator))
        return batcher

    yield factory
    for batcher, generator in started:
        if generator.gate is not None:
            generator.gate.set()  # a failed test must not leave the worker thread waiting
        await batcher.stop()


def decode_color(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").getpixel((0, 0))


async def test_compatible_requests_share_one_call(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake, batch_delay_ms=50)
    results = await asyncio.gather(*(batcher.submit(make_item(f"p{n}", seeds=(n,))) for n in range(5)))
    assert fake.sizes == [5]
    assert sorted(fake.calls[0].prompts) == [f"p{n}" for n in range(5)]
    assert all(r.batch_images == 5 for r in results)


async def test_incompatible_requests_never_share_and_oldest_goes_first(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake, batch_delay_ms=50)
    ref = reference_digest([b"ref"])
    items = [
        make_item("a1"),
        make_item("b1", size=(128, 128)),
        make_item("a2"),
        make_item("c1", steps=4),
        make_item("d1", reference_digest=ref),
        make_item("a3"),
    ]
    await asyncio.gather(*(batcher.submit(item) for item in items))
    groups = [sorted(call.prompts) for call in fake.calls]
    assert groups == [["a1", "a2", "a3"], ["b1"], ["c1"], ["d1"]]
    assert [(c.width, c.steps) for c in fake.calls] == [(64, 2), (128, 2), (64, 4), (64, 2)]


async def test_batches_respect_the_cap_in_images(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake, batch_delay_ms=50, max_batch_images=4)
    items = [make_item(f"p{n}", seeds=(n, n + 100)) for n in range(5)]  # 10 images, 2 per request
    await asyncio.gather(*(batcher.submit(item) for item in items))
    assert fake.sizes == [4, 4, 2]


async def test_a_request_bigger_than_the_cap_runs_in_several_calls(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake, max_batch_images=2)
    result = await batcher.submit(make_item(seeds=(1, 2, 3, 4)))
    assert fake.sizes == [2, 2]
    assert [image.seed for image in result.images] == [1, 2, 3, 4]


async def test_each_image_gets_its_own_seed(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake)
    result = await batcher.submit(make_item(seeds=image_seeds(41, 3)))
    assert [image.seed for image in result.images] == [41, 42, 43]
    assert [decode_color(image.data) for image in result.images] == [seed_color(s) for s in (41, 42, 43)]
    assert fake.calls[0].seeds == [41, 42, 43]


def test_image_seeds_wrap_below_two_to_the_63() -> None:
    assert image_seeds(2**63 - 1, 2) == (2**63 - 1, 0)


async def test_full_queue_is_refused_at_once_with_a_retry_hint(start: Any, fake: FakeGenerator) -> None:
    gate = fake.block()
    batcher = await start(fake, max_queue=2, batch_delay_ms=0)
    running = batcher.submit(make_item("running"))
    await until(fake.entered.is_set)
    queued = [batcher.submit(make_item(f"q{n}")) for n in range(2)]
    with pytest.raises(QueueFull) as refused:
        batcher.submit(make_item("one too many"))
    assert refused.value.retry_after >= 1
    assert batcher.metrics.rejected.labels(reason="queue_full")._value.get() == 1
    gate.set()
    await asyncio.gather(running, *queued)


async def test_queue_bound_in_megapixels(start: Any, fake: FakeGenerator) -> None:
    gate = fake.block()
    batcher = await start(fake, max_queue=10, max_queue_megapixels=0.01, batch_delay_ms=0)
    running = batcher.submit(make_item("running"))
    await until(fake.entered.is_set)
    queued = batcher.submit(make_item(seeds=(1, 2)))  # 8192 px: fits
    with pytest.raises(QueueFull):
        batcher.submit(make_item(seeds=(1, 2)))  # would make 16384 px
    gate.set()
    await asyncio.gather(running, queued)


async def test_deadline_passing_in_the_queue_drops_the_request(start: Any, fake: FakeGenerator) -> None:
    gate = fake.block()
    batcher = await start(fake, batch_delay_ms=0)
    running = batcher.submit(make_item("running"))
    await until(fake.entered.is_set)
    doomed = batcher.submit(make_item("doomed", timeout=0.05))
    with pytest.raises(DeadlineExpired):
        await asyncio.wait_for(doomed, timeout=2)  # while the GPU is still busy
    assert batcher.queue_depth() == 0
    gate.set()
    await running
    assert all("doomed" not in call.prompts for call in fake.calls)
    assert batcher.metrics.rejected.labels(reason="deadline")._value.get() == 1


async def test_a_running_batch_finishes_past_its_deadline(start: Any, fake: FakeGenerator) -> None:
    gate = fake.block()
    batcher = await start(fake, batch_delay_ms=0)
    future = batcher.submit(make_item(timeout=0.05))
    await until(fake.entered.is_set)
    await asyncio.sleep(0.1)
    gate.set()
    assert len((await future).images) == 1


async def test_out_of_memory_splits_the_batch_and_lowers_the_cap(start: Any) -> None:
    fake = FakeGenerator(oom_above=2)
    batcher = await start(fake, batch_delay_ms=50)
    results = await asyncio.gather(*(batcher.submit(make_item(f"p{n}", seeds=(n,))) for n in range(4)))
    assert fake.sizes == [4, 2, 2]
    assert [r.images[0].seed for r in results] == [0, 1, 2, 3]
    assert batcher.metrics.oom._value.get() == 1
    assert batcher.cap_for(64, 64) == 2
    await asyncio.gather(*(batcher.submit(make_item(f"again{n}")) for n in range(4)))
    assert fake.sizes[3:] == [2, 2]  # no second OOM: the lowered cap holds
    assert batcher.metrics.oom._value.get() == 1


async def test_out_of_memory_on_one_image_fails_the_request(start: Any) -> None:
    fake = FakeGenerator(oom_above=0)
    batcher = await start(fake)
    with pytest.raises(OutOfMemory, match="64x64"):
        await batcher.submit(make_item())
    assert batcher.metrics.rejected.labels(reason="out_of_memory")._value.get() == 1


async def test_a_pipeline_error_fails_its_batch_without_its_text(start: Any) -> None:
    batcher = await start(FakeGenerator(fail=True))
    with pytest.raises(GenerationFailed, match="RuntimeError") as failed:
        await batcher.submit(make_item())
    assert "boom" not in str(failed.value)


async def test_not_ready_refuses() -> None:
    batcher = Batcher(make_settings())
    with pytest.raises(NotReady):
        batcher.submit(make_item())
    await batcher.stop()


async def test_a_cancelled_request_leaves_the_queue(start: Any, fake: FakeGenerator) -> None:
    gate = fake.block()
    batcher = await start(fake, batch_delay_ms=0)
    running = batcher.submit(make_item("running"))
    await until(fake.entered.is_set)
    gone = batcher.submit(make_item("gone"))
    assert batcher.queue_depth() == 1
    gone.cancel()
    await asyncio.sleep(0)
    assert batcher.queue_depth() == 0
    gate.set()
    await running


class FlagEverything:
    name = "flag-all"

    def __init__(self) -> None:
        self.seen = 0

    def check(self, images: list[Image.Image]) -> list[bool | None]:
        self.seen += len(images)
        return [True] * len(images)


async def test_safety_checker_blanks_only_the_images_that_asked(start: Any, fake: FakeGenerator) -> None:
    checker = FlagEverything()
    batcher = await start(fake, checker=checker, batch_delay_ms=50)
    checked, unchecked = await asyncio.gather(
        batcher.submit(make_item("checked", seeds=(5,), safety=True)),
        batcher.submit(make_item("unchecked", seeds=(6,), safety=False)),
    )
    assert fake.sizes == [2] and checker.seen == 1
    assert checked.images[0].nsfw is True and decode_color(checked.images[0].data) == (0, 0, 0)
    assert unchecked.images[0].nsfw is None and decode_color(unchecked.images[0].data) == seed_color(6)
    assert batcher.metrics.nsfw_flagged._value.get() == 1


async def test_cost_and_timings_of_a_request(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake, gpu_usd_per_hour=3.6, batch_delay_ms=50)
    one, three = await asyncio.gather(batcher.submit(make_item(seeds=(1,))), batcher.submit(make_item(seeds=(2, 3, 4))))
    assert one.batch_images == three.batch_images == 4
    assert one.inference_s == three.inference_s > 0
    assert three.cost_usd == pytest.approx(3 * one.cost_usd)
    assert one.cost_usd == pytest.approx(3.6 / 3600 * one.inference_s / 4)


async def test_estimated_wait_grows_with_the_queue(start: Any, fake: FakeGenerator) -> None:
    gate = fake.block()
    batcher = await start(fake, batch_delay_ms=0)
    batcher.speed.record(64, 64, 2, 1, 0.5)  # 0.5 s per image at 2 steps
    running = batcher.submit(make_item("running"))
    await until(fake.entered.is_set)
    before = batcher.estimated_wait()
    queued = [batcher.submit(make_item(seeds=(1, 2))) for _ in range(2)]
    assert batcher.estimated_wait() == pytest.approx(before + 4 * 0.5, abs=0.05)
    gate.set()
    await asyncio.gather(running, *queued)


class BrokenChecker:
    name = "broken"

    def check(self, images: list[Image.Image]) -> list[bool | None]:
        raise OSError("classifier weights unreadable")


async def test_a_failing_safety_checker_fails_its_batch_and_the_loop_goes_on(start: Any, fake: FakeGenerator) -> None:
    batcher = await start(fake, checker=BrokenChecker())
    with pytest.raises(GenerationFailed, match="OSError"):
        await batcher.submit(make_item(safety=True))
    result = await asyncio.wait_for(batcher.submit(make_item(safety=False)), timeout=5)
    assert len(result.images) == 1
    assert batcher.metrics.rejected.labels(reason="error")._value.get() == 1
