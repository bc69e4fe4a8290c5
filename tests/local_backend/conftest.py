"""Shared pieces for the local backend's tests: offline mode, a fake generator,
settings and work items. Nothing here downloads anything or imports torch."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from local_backend.batcher import WorkItem
from local_backend.config import Settings
from local_backend.pipeline import BatchCall


class FakeOOM(Exception):
    """Stands in for torch.cuda.OutOfMemoryError."""


def seed_color(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)


class FakeGenerator:
    """A `Generator` that paints each image in a colour derived from its seed.

    `gate`: when set, every call waits for it (a busy GPU). `oom_above`: calls
    with more images raise FakeOOM (`oom_times` times; None means always)."""

    device = "fake"

    def __init__(self, *, oom_above: int | None = None, oom_times: int | None = None, fail: bool = False) -> None:
        self.calls: list[BatchCall] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.oom_above = oom_above
        self.oom_times = oom_times
        self.fail = fail
        self._lock = threading.Lock()

    def block(self) -> threading.Event:
        self.gate = threading.Event()
        return self.gate

    def generate(self, call: BatchCall) -> list[Image.Image]:
        with self._lock:
            self.calls.append(call)
        self.entered.set()
        if self.gate is not None and not self.gate.wait(timeout=10):
            raise RuntimeError("test gate never opened")
        if self.oom_above is not None and len(call.prompts) > self.oom_above and (self.oom_times is None or self.oom_times > 0):
            if self.oom_times is not None:
                self.oom_times -= 1
            raise FakeOOM()
        if self.fail:
            raise RuntimeError("boom")
        return [Image.new("RGB", (call.width, call.height), seed_color(seed)) for seed in call.seeds]

    @property
    def sizes(self) -> list[int]:
        return [len(call.prompts) for call in self.calls]


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator()


def make_settings(**overrides: Any) -> Settings:
    """Tiny, fast settings: 64x64 buckets, short delays, no warm-up sizes beyond 64x64."""
    values: dict[str, Any] = {
        "tiny": True,
        "device": "cpu",
        "buckets": [(64, 64), (128, 128)],
        "warmup_sizes": [(64, 64)],
        "warmup_steps": 2,
        "batch_delay_ms": 20,
    }
    values.update(overrides)
    return Settings(**values)


def make_item(prompt: str = "a fox", *, seeds: tuple[int, ...] = (1,), size: tuple[int, int] = (64, 64), steps: int = 2,
              timeout: float = 10.0, **kw: Any) -> WorkItem:  # fmt: skip
    return WorkItem(prompt=prompt, seeds=seeds, width=size[0], height=size[1], steps=steps,
                    deadline=time.monotonic() + timeout, **kw)  # fmt: skip


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (without blocking the loop) until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
