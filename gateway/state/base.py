"""The state store interface: a few atomic primitives over string keys.

Health (breakers, windows, parking, live figures) and later budgets and runs
are built on these primitives rather than on store-specific methods, so a new
kind of state needs no new store code. Every write carries a TTL so nothing
grows forever; TTLs are real seconds and only collect garbage. Where timing
is part of the meaning (a cooldown, a parking deadline), the value itself
holds the instant and readers compare it with their own clock.

Keys are logical (`health:fal:breaker`); a store adds its own prefix and
namespace (Redis: `klein:<namespace>:`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

StoreStatus = Literal["ok", "degraded"]


class StateStore(ABC):
    """Async key/value primitives, atomic where replicas race."""

    @abstractmethod
    async def get(self, key: str) -> str | None: ...

    @abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """Values in the order of `keys`; None where absent."""

    @abstractmethod
    async def set(self, key: str, value: str, *, ttl_s: float) -> None: ...

    @abstractmethod
    async def set_if_absent(self, key: str, value: str, *, ttl_s: float) -> bool:
        """Set only if no value exists (Redis SET NX PX); True if this call set it."""

    @abstractmethod
    async def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float) -> bool:
        """Replace the value only if it still equals `expected` (None: absent)."""

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    async def compare_and_delete(self, key: str, expected: str) -> bool:
        """Delete only if the value still equals `expected`; True if this call deleted it.
        How a lease holder gives back its own lease and never someone else's."""

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, *, ttl_s: float) -> int:
        """Add to an integer counter (absent counts as 0); refreshes the TTL."""

    @abstractmethod
    async def append_sample(self, key: str, value: float, *, keep: int, ttl_s: float) -> None:
        """Push a number onto a bounded list holding the newest `keep` values."""

    @abstractmethod
    async def samples(self, key: str) -> list[float]:
        """The list's numbers, newest first."""

    @abstractmethod
    async def status(self) -> StoreStatus:
        """ "ok" when the store holds shared state as configured, else "degraded"."""

    async def reconnect(self) -> None:  # noqa: B027 - optional hook
        """Called when the store answers again after failing: drop connections
        that may be stale. The default has none."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
