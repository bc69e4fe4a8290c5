"""Async jobs whose phase follows from the clock, not from background tasks.

A job records when it was created and how long each phase lasts (copied
from the knobs at creation, so later knob changes leave it alone). Each poll
computes the phase from the elapsed time: nothing runs between polls, which
keeps thousands of jobs free.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.emulators.images import StoredImage
from tests.emulators.knobs import JobTiming

Phase = Literal["queued", "dispatching", "running", "succeeded", "failed", "canceled", "aborted"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass(frozen=True, slots=True)
class Spec:
    """What a job makes, already normalised by the provider module."""

    prompt: str
    width: int
    height: int
    fmt: str = "png"
    n: int = 1
    seed: int = 0
    edit_refs: int = 0
    steps: int = 4


@dataclass(slots=True)
class Job:
    id: str
    spec: Spec
    input: dict[str, Any]
    created: float  # time.monotonic()
    created_wall: float  # time.time()
    queue_s: float
    dispatch_s: float
    run_s: float
    stuck: bool = False
    failed: bool = False  # ends in failed (fault, validation, content filter)
    failure: dict[str, Any] = field(default_factory=dict)  # provider-specific detail
    nsfw: tuple[bool, ...] = ()
    cancel_after_s: float | None = None  # Replicate's Cancel-After: aborted if not started, canceled if running
    start_deadline_s: float | None = None  # fal's X-Fal-Request-Timeout: aborted if not started, else no effect
    canceled_at: float | None = None
    canceled_phase: str | None = None  # the phase it was in when canceled
    images: list[StoredImage] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def start_offset(self) -> float:
        return self.queue_s + self.dispatch_s

    @property
    def end_offset(self) -> float:
        return self.queue_s + self.dispatch_s + self.run_s

    def phase(self, now: float | None = None) -> Phase:
        now = time.monotonic() if now is None else now
        if self.canceled_at is not None:
            return "aborted" if self.canceled_phase == "aborted" else "canceled"
        elapsed = now - self.created
        if self.start_deadline_s is not None and elapsed >= self.start_deadline_s and (self.stuck or self.start_deadline_s < self.start_offset):
            self.canceled_at = self.created + self.start_deadline_s
            self.canceled_phase = "aborted"
            return "aborted"
        if self.cancel_after_s is not None and elapsed >= self.cancel_after_s and (self.stuck or self.cancel_after_s < self.end_offset):
            # the deadline passed before the job finished
            started = not self.stuck and self.cancel_after_s >= self.start_offset
            self.canceled_at = self.created + self.cancel_after_s
            self.canceled_phase = "running" if started else "aborted"
            return "canceled" if started else "aborted"
        if self.stuck or elapsed < self.queue_s:
            return "queued"
        if elapsed < self.start_offset:
            return "dispatching"
        if elapsed < self.end_offset:
            return "running"
        return "failed" if self.failed else "succeeded"

    def cancel(self, now: float | None = None) -> Phase:
        """Cancel unless terminal; returns the phase it was in."""
        now = time.monotonic() if now is None else now
        phase = self.phase(now)
        if phase not in TERMINAL:
            self.canceled_at = now
            self.canceled_phase = phase
        return phase

    def seconds_until_done(self, now: float | None = None) -> float | None:
        """None if it will never finish on its own (stuck, no deadline)."""
        if self.stuck:
            deadlines = [d for d in (self.cancel_after_s, self.start_deadline_s) if d is not None]
            if not deadlines:
                return None
            now = time.monotonic() if now is None else now
            return max(0.0, min(deadlines) - (now - self.created))
        now = time.monotonic() if now is None else now
        end = self.end_offset
        if self.cancel_after_s is not None:
            end = min(end, self.cancel_after_s)
        if self.start_deadline_s is not None and self.start_deadline_s < self.start_offset:
            end = min(end, self.start_deadline_s)
        return max(0.0, end - (now - self.created))

    def wall(self, offset: float) -> float:
        return self.created_wall + offset

    @property
    def started_wall(self) -> float:
        return self.created_wall + self.start_offset

    @property
    def completed_wall(self) -> float:
        if self.canceled_at is not None:
            return self.created_wall + (self.canceled_at - self.created)
        return self.created_wall + self.end_offset


def compact(value: Any, limit: int = 2048) -> Any:
    """The input as echoed back, with long strings (data: URIs of reference
    images) cut short, so thousands of stored edit jobs stay small."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:64]}...[{len(value)} chars]"
    if isinstance(value, dict):
        return {k: compact(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v, limit) for v in value]
    return value


class JobBook:
    """The emulator's jobs, bounded (oldest forgotten first)."""

    def __init__(self, max_jobs: int = 20_000) -> None:
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def create(
        self,
        spec: Spec,
        input: dict[str, Any],
        timing: JobTiming,
        *,
        prefix: str = "",
        id_bytes: int = 12,
        stuck: bool = False,
        failed: bool = False,
        nsfw: tuple[bool, ...] = (),
    ) -> Job:
        job = Job(
            id=prefix + secrets.token_hex(id_bytes),
            spec=spec,
            input=compact(input),
            created=time.monotonic(),
            created_wall=time.time(),
            queue_s=timing.queue_ms / 1000,
            dispatch_s=timing.dispatch_ms / 1000,
            run_s=timing.run_ms / 1000,
            stuck=stuck,
            failed=failed,
            nsfw=nsfw,
        )
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def clear(self) -> None:
        with self._lock:
            self._jobs.clear()

    def _phases_now(self) -> list[Phase]:
        now = time.monotonic()
        with self._lock:
            jobs = list(self._jobs.values())
        return [job.phase(now) for job in jobs]

    def succeeded(self) -> int:
        """Jobs that have ended `succeeded` by now: the work a provider that bills successes only charges for."""
        return sum(1 for phase in self._phases_now() if phase == "succeeded")

    def open(self) -> int:
        """Jobs not ended by now (queued, starting or running): work that may still run and bill."""
        return sum(1 for phase in self._phases_now() if phase not in TERMINAL)

    def __len__(self) -> int:
        return len(self._jobs)
