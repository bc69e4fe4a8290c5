"""Dynamic batching in front of one pipeline, with one worker thread.

Rules (docs/local-backend.md#batching):

* A bounded FIFO queue. A request that would make it longer than `max_queue`
  (or, when set, hold more than `max_queue_megapixels`) is refused at once
  with `QueueFull` (HTTP 429 + Retry-After), so the gateway can go elsewhere.
* The loop takes the oldest request, waits until it has been queued for
  `batch_delay_ms` or until enough compatible work is queued to fill a batch,
  then takes every queued request with the same `BatchKey` in FIFO order while
  the images fit the size's cap. Starting from the oldest request keeps rare
  sizes from starving.
* Requests whose deadline passes while queued are dropped with
  `DeadlineExpired` (HTTP 504) the moment it passes; a batch that started runs
  to the end.
* The pipeline runs in exactly one worker thread (it keeps per-call state on
  itself and is not thread-safe); model loading and warm-up run there too.
* Out of memory: the failed call is split in halves and retried, the size's
  cap is lowered to the half that is tried next, and it is counted. A single
  image that does not fit fails its batch with `OutOfMemory`.
* Encoding and the safety check also run in the worker thread, off the event loop.
* Previews (docs/local-backend.md#previews): each image of a request that asks
  for `partial_images` gets them after the steps `preview_steps` names,
  decoded from its own rows of the batch's latents and handed to that
  request's `on_preview` only; a request that asks for none gets none. After
  an out-of-memory split a step already previewed is not sent again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

from PIL import Image

from local_backend import cost
from local_backend.buckets import BatchKey, batch_cap, bucket_label
from local_backend.config import Settings
from local_backend.images import CONTENT_TYPES, Reference, encode
from local_backend.metrics import BackendMetrics
from local_backend.pipeline import (
    BatchCall,
    Generator,
    device_oom_errors,
    peak_memory_bytes,
    release_memory,
)
from local_backend.safety import NoSafetyChecker, SafetyChecker, blank_like
from local_backend.schemas import preview_steps
from local_backend.speed import SpeedBook, UtilizationWindow

log = logging.getLogger(__name__)
T = TypeVar("T")

SEED_MODULUS = 2**63  # per-image seeds wrap here so they stay valid request seeds
PREVIEW_COMPRESSION = 25  # output_compression of previews: jpeg/webp quality 75, png zlib level 2


class NotReady(Exception):
    """The model is loading or warming up, or the service is shutting down (503)."""


class QueueFull(Exception):
    """Backpressure (429); `retry_after` is the estimated wait in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the queue is full")
        self.retry_after = retry_after


class DeadlineExpired(Exception):
    """The request's deadline passed before its batch started (504)."""


class OutOfMemory(Exception):
    """Even one image of this size does not fit on the device (503)."""


class GenerationFailed(Exception):
    """The pipeline raised; the message is safe to return (500)."""


def image_seeds(seed: int, count: int) -> tuple[int, ...]:
    """Image k of a request uses seed + k, so a single image can be reproduced alone."""
    return tuple((seed + k) % SEED_MODULUS for k in range(count))


def random_seed() -> int:
    return secrets.randbelow(2**32)


@dataclass(eq=False)
class WorkItem:
    """One queued request."""

    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    deadline: float  # time.monotonic() instant
    references: tuple[Reference, ...] = ()
    reference_digest: str | None = None
    output_format: str = "png"
    output_compression: int | None = None
    safety: bool = False
    partial_images: int = 0
    # Called in the worker thread with each preview of this request: must be thread-safe.
    on_preview: Callable[[Preview], None] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    started: bool = False
    future: asyncio.Future[ItemResult] | None = None
    _expiry: asyncio.TimerHandle | None = None

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.width, self.height, self.steps, self.reference_digest)

    @property
    def images(self) -> int:
        return len(self.seeds)

    @property
    def megapixels(self) -> float:
        return self.width * self.height * self.images / 1_000_000


@dataclass(frozen=True, slots=True)
class Preview:
    """One partial image of one request: image `index` of the request, its
    `partial_image_index`-th preview (0, 1, ...), after `step` denoising steps."""

    index: int
    partial_image_index: int
    step: int
    data: bytes
    content_type: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class OutputImage:
    data: bytes
    content_type: str
    width: int
    height: int
    seed: int
    nsfw: bool | None


@dataclass(frozen=True, slots=True)
class ItemResult:
    images: list[OutputImage]
    queue_s: float
    inference_s: float  # busy time of the whole batch this request ran in
    batch_images: int
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class CallTiming:
    images: int
    seconds: float


@dataclass
class BatchOutcome:
    outputs: list[list[OutputImage]]  # per item
    calls: list[CallTiming]
    busy_s: float


class BatchRunner:
    """Runs one batch in the worker thread: pipeline calls, OOM splitting,
    safety check, encoding. Synchronous; knows nothing about asyncio."""

    def __init__(
        self,
        generator: Generator,
        checker: SafetyChecker,
        metrics: BackendMetrics,
        oom_errors: tuple[type[BaseException], ...],
        cap_for: Callable[[int, int], int],
        lower_cap: Callable[[int, int, int], None],
        bucket_of: Callable[[int, int], str],
    ) -> None:
        self.generator = generator
        self.checker = checker
        self.metrics = metrics
        self.oom_errors = oom_errors
        self.cap_for = cap_for
        self.lower_cap = lower_cap
        self.bucket_of = bucket_of

    def run(self, items: Sequence[WorkItem]) -> BatchOutcome:
        first = items[0]
        width, height, steps = first.width, first.height, first.steps
        references = tuple(ref.decode() for ref in first.references)  # equal for all: same key
        work = [(index, item.prompt, seed) for index, item in enumerate(items) for seed in item.seeds]
        image_of = [k for item in items for k in range(item.images)]  # position in `work` -> image index in its request
        wanted = [preview_steps(steps, items[index].partial_images) if items[index].on_preview else () for index, _, _ in work]
        sent: dict[int, set[int]] = {}  # position in `work` -> steps already previewed

        def on_preview(chunk: list[int], position: int, step: int, image: Image.Image) -> None:
            n = chunk[position]
            done = sent.setdefault(n, set())
            item = items[work[n][0]]
            if step in done or item.on_preview is None:
                return  # a step seen before an out-of-memory retry
            done.add(step)
            preview = Preview(
                index=image_of[n],
                partial_image_index=len(done) - 1,
                step=step,
                data=encode(image, item.output_format, PREVIEW_COMPRESSION),
                content_type=CONTENT_TYPES[item.output_format],
                width=image.width,
                height=image.height,
            )
            self.metrics.previews.inc()
            item.on_preview(preview)

        cap = self.cap_for(width, height)
        pending = deque(list(range(n, min(n + cap, len(work)))) for n in range(0, len(work), cap))
        produced: list[Image.Image | None] = [None] * len(work)
        calls: list[CallTiming] = []
        bucket = self.bucket_of(width, height)
        while pending:
            chunk = pending.popleft()  # positions in `work`
            previews = [wanted[n] for n in chunk]
            call = BatchCall(
                [work[n][1] for n in chunk], [work[n][2] for n in chunk], width, height, steps, references,
                previews=previews if any(previews) else (), on_preview=partial(on_preview, chunk) if any(previews) else None,
            )  # fmt: skip
            started = time.perf_counter()
            try:
                images = self.generator.generate(call)
            except self.oom_errors:
                self.metrics.oom.inc()
                release_memory()
                if len(chunk) == 1:
                    raise OutOfMemory(f"one {width}x{height} image does not fit in device memory") from None
                half = len(chunk) // 2
                self.lower_cap(width, height, half)
                log.warning("out of memory at %dx%d with %d images; retrying as %d + %d",
                            width, height, len(chunk), half, len(chunk) - half)  # fmt: skip
                pending.appendleft(chunk[half:])
                pending.appendleft(chunk[:half])
                continue
            except Exception as exc:
                log.exception("pipeline call failed")
                raise GenerationFailed(f"the pipeline failed: {type(exc).__name__}") from None
            seconds = time.perf_counter() - started
            if len(images) != len(chunk):
                raise GenerationFailed(f"the pipeline returned {len(images)} images for {len(chunk)}")
            calls.append(CallTiming(len(chunk), seconds))
            self.metrics.forwards.inc()
            self.metrics.inference.labels(bucket=bucket).observe(seconds)
            self.metrics.batch_images.observe(len(chunk))
            for n, image in zip(chunk, images, strict=True):
                produced[n] = image
        busy = sum(c.seconds for c in calls)
        outputs = self._finish(items, work, produced)
        self.metrics.gpu_busy.inc(busy)
        self.metrics.images.labels(bucket=bucket).inc(len(work))
        return BatchOutcome(outputs=outputs, calls=calls, busy_s=busy)

    def _finish(self, items: Sequence[WorkItem], work: list[tuple[int, str, int]], produced: list[Image.Image | None]) -> list[list[OutputImage]]:
        """Safety check (one call for every image that asked for it), then encode."""
        checked = [n for n, (index, _, _) in enumerate(work) if items[index].safety]
        flags: list[bool | None] = [None] * len(work)
        if checked and not isinstance(self.checker, NoSafetyChecker):
            ready = cast("list[Image.Image]", [produced[n] for n in checked])  # every slot is filled once the calls return
            for n, flag in zip(checked, self.checker.check(ready), strict=True):
                flags[n] = flag
        outputs: list[list[OutputImage]] = [[] for _ in items]
        for n, (index, _, seed) in enumerate(work):
            item, image = items[index], produced[n]
            assert image is not None
            if flags[n]:
                self.metrics.nsfw_flagged.inc()
                image = blank_like(image)
            outputs[index].append(
                OutputImage(
                    data=encode(image, item.output_format, item.output_compression),
                    content_type=CONTENT_TYPES[item.output_format],
                    width=image.width,
                    height=image.height,
                    seed=seed,
                    nsfw=flags[n],
                )
            )
        return outputs


class Batcher:
    """The queue, the batching loop and the worker thread around one generator."""

    def __init__(
        self,
        settings: Settings,
        metrics: BackendMetrics | None = None,
        *,
        oom_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics or BackendMetrics()
        self.oom_errors = oom_errors
        self.speed = SpeedBook(settings.buckets)
        self.utilization = UtilizationWindow(settings.utilization_window_s)
        self.ready = False
        self.problem: str | None = None  # why loading or warm-up failed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klein-pipeline")
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._runner: BatchRunner | None = None
        self._caps: dict[tuple[int, int], int] = {}
        self._running: tuple[float, float] | None = None  # (started_at, estimated seconds)

    # ---- lifecycle -------------------------------------------------------------

    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in the pipeline's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def attach(self, generator: Generator, checker: SafetyChecker | None = None) -> None:
        """Use this generator from now on. torch's OOM type joins the configured
        ones here, once loading has imported torch."""
        self._runner = BatchRunner(
            generator,
            checker or NoSafetyChecker(),
            self.metrics,
            tuple(dict.fromkeys(self.oom_errors + device_oom_errors())),
            self.cap_for,
            self._lower_cap,
            lambda w, h: bucket_label(w, h, self.settings.buckets),
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="klein-batcher")

    def mark_ready(self) -> None:
        self.ready = True
        self.metrics.ready.set(1)
        self.utilization.start()

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            self._fail(self._queue.popleft(), NotReady("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def warm_up(self, sizes: Sequence[tuple[int, int]], steps: int) -> None:
        """One throwaway call, then one timed call per size (every batch size up
        to the cap when compiled, since each shape compiles anew); timings seed
        the speed book."""
        runner = self._require_runner()
        if not sizes:
            return
        smallest = min(sizes, key=lambda s: s[0] * s[1])
        await self.in_worker(runner.generator.generate, BatchCall(["warm-up"], [0], *smallest, 1))
        for width, height in sizes:
            counts = range(1, self.cap_for(width, height) + 1) if self.settings.compile else (1,)
            for count in counts:
                call = BatchCall(["warm-up"] * count, list(range(count)), width, height, steps)
                started = time.perf_counter()
                await self.in_worker(runner.generator.generate, call)
                self.speed.record(width, height, steps, count, time.perf_counter() - started)
            log.info("warmed up %dx%d", width, height)

    def _require_runner(self) -> BatchRunner:
        if self._runner is None:
            raise NotReady("no pipeline attached")
        return self._runner

    # ---- admission -------------------------------------------------------------

    def submit(self, item: WorkItem) -> asyncio.Future[ItemResult]:
        """Queue a request; its future resolves with the result or a batcher error."""
        if not self.ready:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady(self.problem or "the model is still loading")
        if self._queue_is_full(item):
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(retry_after=max(1.0, math.ceil(self.estimated_wait())))
        loop = asyncio.get_running_loop()
        item.future = loop.create_future()
        item._expiry = loop.call_later(max(0.0, item.deadline - time.monotonic()), self._expire, item)
        item.future.add_done_callback(lambda future: self._forget(item) if future.cancelled() else None)
        self._queue.append(item)
        self._update_gauges()
        self._wakeup.set()
        return item.future

    def _queue_is_full(self, item: WorkItem) -> bool:
        if len(self._queue) >= self.settings.max_queue:
            return True
        limit = self.settings.max_queue_megapixels
        return limit is not None and bool(self._queue) and self.queued_megapixels() + item.megapixels > limit

    def _expire(self, item: WorkItem) -> None:
        if item.started or item not in self._queue:
            return
        self._queue.remove(item)
        self.metrics.rejected.labels(reason="deadline").inc()
        self._fail(item, DeadlineExpired("the deadline passed before generation started"))
        self._update_gauges()

    def _forget(self, item: WorkItem) -> None:
        """The caller went away (its future was cancelled): drop it if still queued."""
        if item._expiry is not None:
            item._expiry.cancel()
        if not item.started and item in self._queue:
            self._queue.remove(item)
            self._update_gauges()

    @staticmethod
    def _fail(item: WorkItem, error: Exception) -> None:
        if item._expiry is not None:
            item._expiry.cancel()
        if item.future is not None and not item.future.done():
            item.future.set_exception(error)

    # ---- caps and estimates ----------------------------------------------------

    def cap_for(self, width: int, height: int) -> int:
        configured = batch_cap(width, height, max_images=self.settings.max_batch_images, max_pixels=self.settings.max_batch_pixels)
        return min(configured, self._caps.get((width, height), configured))

    def _lower_cap(self, width: int, height: int, cap: int) -> None:
        self._caps[(width, height)] = max(1, min(cap, self._caps.get((width, height), cap)))

    def queue_depth(self) -> int:
        return len(self._queue)

    def queued_megapixels(self) -> float:
        return sum(item.megapixels for item in self._queue)

    def _estimate(self, item: WorkItem) -> float:
        per_image = self.speed.seconds_per_image(item.width, item.height, item.steps)
        return 0.0 if per_image is None else per_image * item.images

    def estimated_wait(self) -> float:
        """Seconds a new request would wait before its batch starts: what is left
        of the running batch plus the queue, image by image (batching makes the
        real wait shorter)."""
        wait = sum(self._estimate(item) for item in self._queue)
        if self._running is not None:
            started_at, estimate = self._running
            wait += max(0.0, estimate - (time.monotonic() - started_at))
        return wait

    def _update_gauges(self) -> None:
        self.metrics.set_queue(len(self._queue), self.queued_megapixels())

    # ---- the loop --------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    async def _gather(self) -> None:
        """Wait until the oldest request is `batch_delay_ms` old or its batch is full."""
        delay = self.settings.batch_delay_ms / 1000.0
        while self._queue:
            oldest = self._queue[0]
            remaining = oldest.enqueued_at + delay - time.monotonic()
            if remaining <= 0 or self._compatible_images(oldest.key) >= self.cap_for(oldest.width, oldest.height):
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _compatible_images(self, key: BatchKey) -> int:
        return sum(item.images for item in self._queue if item.key == key)

    def _take_batch(self) -> list[WorkItem]:
        if not self._queue:
            return []
        oldest = self._queue[0]
        key, cap = oldest.key, self.cap_for(oldest.width, oldest.height)
        batch: list[WorkItem] = []
        total = 0
        for item in list(self._queue):
            if item.key != key:
                continue
            if batch and total + item.images > cap:
                break
            batch.append(item)
            total += item.images
        for item in batch:
            self._queue.remove(item)
            item.started = True
            if item._expiry is not None:
                item._expiry.cancel()
        self._update_gauges()
        return [item for item in batch if item.future is not None and not item.future.done()]

    async def _execute(self, batch: list[WorkItem]) -> None:
        runner = self._require_runner()
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.observe(started - item.enqueued_at)
        self._running = (started, sum(self._estimate(item) for item in batch))
        try:
            outcome = await self.in_worker(runner.run, batch)
        except Exception as exc:  # the loop must outlive any batch
            error: Exception = exc
            if not isinstance(exc, (OutOfMemory, GenerationFailed)):
                log.exception("batch failed after generation")
                error = GenerationFailed(f"the batch failed: {type(exc).__name__}")
            reason = "out_of_memory" if isinstance(error, OutOfMemory) else "error"
            self.metrics.rejected.labels(reason=reason).inc(len(batch))
            for item in batch:
                self._fail(item, error)
            return
        finally:
            self._running = None
        first = batch[0]
        for call in outcome.calls:
            self.speed.record(first.width, first.height, first.steps, call.images, call.seconds)
        self.utilization.add(outcome.busy_s)
        self._publish_resources()
        batch_images = sum(item.images for item in batch)
        for item, images in zip(batch, outcome.outputs, strict=True):
            if item.future is None or item.future.done():
                continue
            item.future.set_result(
                ItemResult(
                    images=images,
                    queue_s=started - item.enqueued_at,
                    inference_s=outcome.busy_s,
                    batch_images=batch_images,
                    cost_usd=cost.request_cost(self.settings.gpu_usd_per_hour, outcome.busy_s, item.images, batch_images),
                )
            )

    def _publish_resources(self) -> None:
        peak = peak_memory_bytes()
        if peak is not None:
            self.metrics.gpu_memory_peak.set(peak)
