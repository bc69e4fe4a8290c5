"""A read-only snapshot of one backend's health, as routing sees it.

Produced by the health tracker (breakers, latency statistics, Retry-After
parking, live figures from probes) and consumed by the pure router, so the
router never touches the state store.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class HealthView:
    state: BreakerState = BreakerState.CLOSED
    parked_for_s: float = 0.0  # remaining Retry-After parking
    credentials_invalid: bool = False
    latency_p50_s: float | None = None  # recent upstream latency, for tie-breaks
    latency_p95_s: float | None = None
    error_rate: float = 0.0
    # Live figures a backend reports about itself (the local GPU's queue).
    estimated_wait_s: float | None = None
    live_usd_per_image: Decimal | None = None

    @property
    def available(self) -> bool:
        return self.state is not BreakerState.OPEN and self.parked_for_s <= 0 and not self.credentials_invalid

    @property
    def why_unavailable(self) -> str:
        if self.credentials_invalid:
            return "credentials rejected"
        if self.state is BreakerState.OPEN:
            return "circuit open"
        if self.parked_for_s > 0:
            return f"rate limited for {self.parked_for_s:.1f}s"
        return ""


HEALTHY = HealthView()
