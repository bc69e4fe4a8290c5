"""The circuit breaker: its stored record, its thresholds, and pure transitions.

closed -> open on a failure rate over a sliding window (with a minimum count)
or on failures in a row; open -> half-open once the cooldown has run (read
lazily from the record, so no timer writes it); half-open -> closed on a good
trial, or -> open again with the cooldown multiplied (capped). A breaker
that re-opens within one window of closing also grows its cooldown, so a
flapping backend is not retried at the base rate forever (BerriAI/litellm#40130,
docs/design.md#lessons-from-other-gateways: a second failure must extend the cooldown).

No I/O here: `HealthTracker` (gateway/health/tracker.py) reads the facts from the
state store, calls these functions and compare-and-sets the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.health.view import BreakerState


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """The stored breaker. OPEN turns into HALF_OPEN by itself once the cooldown
    has run (`effective`), so no timer has to write the change."""

    state: BreakerState = BreakerState.CLOSED
    since: float = 0.0  # when this state began
    cooldown_s: float = 0.0  # of the latest opening; the next one grows from it
    gen: int = 0  # window generation
    version: int = 0  # bumped on every write
    closed_at: float | None = None

    def effective(self, now: float) -> BreakerState:
        if self.state is BreakerState.OPEN and now >= self.since + self.cooldown_s:
            return BreakerState.HALF_OPEN
        return self.state

    def cooldown_left(self, now: float) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.since + self.cooldown_s - now)

    def moved(self, **changes: Any) -> BreakerRecord:
        return replace(self, version=self.version + 1, **changes)

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | None) -> BreakerRecord:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            data["state"] = BreakerState(data["state"])
            return cls(**data)
        except (ValueError, TypeError, KeyError):
            return cls()  # an unreadable record is a closed breaker, not an outage


@dataclass(frozen=True, slots=True)
class Window:
    ok: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.total if self.total else 0.0


class BreakerPolicy(BaseModel):
    """One backend's breaker thresholds (providers.yaml `breaker:`); the
    defaults suit hosted image APIs where one generation takes seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(60.0, gt=0, description="sliding window for the failure rate")
    min_requests: int = Field(5, ge=1, description="requests in the window before the rate may open")
    failure_rate: float = Field(0.5, gt=0, le=1)
    consecutive_failures: int = Field(3, ge=0, description="failures in a row that open; 0 disables")
    cooldown_s: float = Field(5.0, gt=0, description="first cooldown; each re-opening multiplies it")
    cooldown_multiplier: float = Field(2.0, ge=1)
    cooldown_max_s: float = Field(300.0, gt=0)
    half_open_max_trials: int = Field(1, ge=1, description="concurrent trial requests across replicas")
    trial_timeout_s: float = Field(120.0, gt=0, description="a trial lease lapses after this (its holder died)")
    default_park_s: float = Field(5.0, ge=0, description="parking for a 429/503 without Retry-After")
    out_of_credit_park_s: float = Field(300.0, ge=0, description="parking after a 402")
    credentials_recheck_s: float = Field(3600.0, gt=0, description="a credentials mark lapses after this")
    probe_failures_to_open: int | None = Field(3, ge=1, description="failed free probes in a row that open a closed breaker; null disables")
    probe_ends_cooldown: bool = Field(True, description="a good probe moves an open breaker to half-open once it was open cooldown_s")
    latency_samples: int = Field(100, ge=1, le=10_000)

    @model_validator(mode="after")
    def _cooldowns_ordered(self) -> BreakerPolicy:
        if self.cooldown_max_s < self.cooldown_s:
            raise ValueError("cooldown_max_s must be at least cooldown_s")
        return self


# ---- pure transitions: (record, facts) -> the new record, or None for no change ----


def should_open(policy: BreakerPolicy, window: Window, failures_in_row: int) -> bool:
    if policy.consecutive_failures and failures_in_row >= policy.consecutive_failures:
        return True
    return window.total >= policy.min_requests and window.error_rate >= policy.failure_rate


def opened(record: BreakerRecord, now: float, policy: BreakerPolicy, *, grow: bool) -> BreakerRecord:
    cooldown = policy.cooldown_s
    if grow and record.cooldown_s:
        cooldown = min(max(record.cooldown_s * policy.cooldown_multiplier, policy.cooldown_s), policy.cooldown_max_s)
    return record.moved(state=BreakerState.OPEN, since=now, cooldown_s=cooldown)


def after_failure(record: BreakerRecord, now: float, policy: BreakerPolicy, window: Window, failures_in_row: int) -> BreakerRecord | None:
    """A counted failure: re-opens a half-open breaker (cooldown grown), or
    opens a closed one that crossed a threshold."""
    state = record.effective(now)
    if state is BreakerState.HALF_OPEN:
        return opened(record, now, policy, grow=True)
    if state is BreakerState.CLOSED and should_open(policy, window, failures_in_row):
        flapping = record.closed_at is not None and now - record.closed_at < policy.window_s
        return opened(record, now, policy, grow=flapping)
    return None


def after_success(record: BreakerRecord, now: float) -> BreakerRecord | None:
    """A success while half-open closes the breaker and starts a fresh window."""
    if record.effective(now) is BreakerState.HALF_OPEN:
        return record.moved(state=BreakerState.CLOSED, since=now, gen=record.gen + 1, closed_at=now)
    return None


def after_probe(record: BreakerRecord, now: float, policy: BreakerPolicy, ok: bool, probe_failures_in_row: int) -> BreakerRecord | None:
    """Probes never close a breaker: a free probe (a model list, a status
    page) can pass while generation fails. A good probe may end an open
    breaker's cooldown early, once it has been open `cooldown_s` (a real
    trial then decides); failed probes in a row may open a closed breaker, so
    no user request is spent finding out a backend is gone. A failed probe
    never moves an open or half-open breaker: a broken probe endpoint must not
    keep a working backend shut."""
    state = record.effective(now)
    if ok:
        if policy.probe_ends_cooldown and state is BreakerState.OPEN and now - record.since >= policy.cooldown_s:
            return record.moved(state=BreakerState.HALF_OPEN, since=now)
        return None
    limit = policy.probe_failures_to_open
    if state is BreakerState.CLOSED and limit and probe_failures_in_row >= limit:
        return opened(record, now, policy, grow=False)
    return None
