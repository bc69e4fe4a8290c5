"""Measured speed: seconds per image by size, and GPU utilisation over a window.

Both feed the figures the gateway routes on: the estimated queue wait and the
live cost per image (docs/local-backend.md#queue-back-pressure-and-deadlines, #cost-per-image).

Speed is kept per exact size as an exponentially weighted mean of busy seconds
per image, normalised to 4 steps by scaling linearly with the step count (an
approximation: the text encoder and VAE cost does not scale with steps, so it
slightly overstates few-step and understates many-step runs). A size never
measured is estimated from the measured size nearest in pixels, scaled by the
pixel ratio.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable

from local_backend.buckets import size_label

REFERENCE_STEPS = 4
EWMA_WEIGHT = 0.3  # weight of the newest measurement
MAX_OTHER_SIZES = 64  # non-bucket sizes remembered, least recently measured dropped first


class SpeedBook:
    def __init__(self, buckets: Iterable[tuple[int, int]] = ()) -> None:
        self._buckets = {size_label(w, h) for w, h in buckets}
        self._seconds: OrderedDict[str, float] = OrderedDict()  # label -> s/img at 4 steps
        self._pixels: dict[str, int] = {}

    def record(self, width: int, height: int, steps: int, images: int, seconds: float) -> None:
        if images <= 0 or seconds <= 0:
            return
        label = size_label(width, height)
        value = seconds / images * REFERENCE_STEPS / steps
        old = self._seconds.pop(label, None)
        self._seconds[label] = value if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * value
        self._pixels[label] = width * height
        self._forget_old_sizes()

    def _forget_old_sizes(self) -> None:
        others = [label for label in self._seconds if label not in self._buckets]
        for label in others[: max(0, len(others) - MAX_OTHER_SIZES)]:
            del self._seconds[label]
            del self._pixels[label]

    def seconds_per_image(self, width: int, height: int, steps: int = REFERENCE_STEPS) -> float | None:
        """Estimated busy seconds for one image; None before any measurement."""
        if not self._seconds:
            return None
        label = size_label(width, height)
        if label in self._seconds:
            at_ref = self._seconds[label]
        else:
            pixels = width * height
            nearest = min(self._pixels, key=lambda key: abs(self._pixels[key] - pixels))
            at_ref = self._seconds[nearest] * pixels / self._pixels[nearest]
        return at_ref * steps / REFERENCE_STEPS

    def by_size(self) -> dict[str, float]:
        """Measured seconds per image at 4 steps, by 'WxH'."""
        return {label: round(value, 6) for label, value in self._seconds.items()}


class UtilizationWindow:
    """Busy time over wall time in a sliding window, from the moment serving began."""

    def __init__(self, window_s: float, clock=time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._started: float | None = None
        self._busy: deque[tuple[float, float]] = deque()  # (ended_at, busy seconds)

    def start(self) -> None:
        self._started = self._clock()

    def add(self, busy_s: float) -> None:
        self._busy.append((self._clock(), busy_s))

    def utilization(self) -> float | None:
        """0..1; None before serving began or before any wall time passed."""
        if self._started is None:
            return None
        now = self._clock()
        while self._busy and self._busy[0][0] < now - self.window_s:
            self._busy.popleft()
        wall = min(self.window_s, now - self._started)
        if wall <= 0:
            return None
        return min(1.0, sum(busy for _, busy in self._busy) / wall)
