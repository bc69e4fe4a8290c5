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

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

StoreStatus = Literal["ok", "degraded"]
OpKind = Literal["get", "samples", "set", "raise_to", "delete", "incr", "append", "publish"]
READS: frozenset[str] = frozenset({"get", "samples"})


class StoreUnavailable(Exception):
    """The store every replica shares cannot be reached: a `*_shared` call
    did nothing rather than answer from this replica's memory."""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a batch (`StateStore.batch`), built with the class methods.

    Answers, in the batch's order: get -> the value or None; samples -> the
    list, newest first; incr -> the new count; raise_to -> whether it raised
    the value; the others -> None."""

    kind: OpKind
    key: str  # publish: the logical channel
    value: str = ""
    amount: int = 0
    number: float = 0.0
    numbers: tuple[float, ...] = ()  # append: oldest first
    ttl_s: float = 0.0
    keep: int = 0

    @classmethod
    def get(cls, key: str) -> Op:
        return cls("get", key)

    @classmethod
    def samples(cls, key: str) -> Op:
        return cls("samples", key)

    @classmethod
    def set(cls, key: str, value: str, *, ttl_s: float) -> Op:
        return cls("set", key, value, ttl_s=ttl_s)

    @classmethod
    def raise_to(cls, key: str, number: float, *, ttl_s: float) -> Op:
        """Set a number unless the stored one is already at least as large (a parking deadline)."""
        return cls("raise_to", key, repr(float(number)), number=float(number), ttl_s=ttl_s)

    @classmethod
    def delete(cls, key: str) -> Op:
        return cls("delete", key)

    @classmethod
    def incr(cls, key: str, amount: int = 1, *, ttl_s: float) -> Op:
        return cls("incr", key, amount=amount, ttl_s=ttl_s)

    @classmethod
    def append(cls, key: str, *numbers: float, keep: int, ttl_s: float) -> Op:
        """Push numbers (oldest first) onto a bounded list (`append_sample`, several at once)."""
        return cls("append", key, numbers=tuple(float(n) for n in numbers), keep=keep, ttl_s=ttl_s)

    @classmethod
    def publish(cls, channel: str, message: str) -> Op:
        return cls("publish", channel, message)


def as_number(raw: str | None) -> float:
    try:
        return float(raw) if raw is not None else float("-inf")
    except ValueError:
        return float("-inf")


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

    async def set_if_absent_shared(self, key: str, value: str, *, ttl_s: float) -> bool:
        """`set_if_absent` on the state every replica sees, or StoreUnavailable:
        for promises memory cannot keep across replicas (an idempotency claim).
        A store without a fallback is that state already."""
        return await self.set_if_absent(key, value, ttl_s=ttl_s)

    async def get_shared(self, key: str) -> str | None:
        """`get` from the state every replica sees, or StoreUnavailable."""
        return await self.get(key)

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

    async def batch(self, ops: Sequence[Op]) -> list[Any]:
        """Run `ops` in order and answer each (see `Op`): one round trip on a
        shared store, not atomic as a whole (each operation is, as alone).
        This default runs them one by one through the primitives above."""
        out: list[Any] = []
        for op in ops:
            out.append(await self._one(op))
        return out

    async def _one(self, op: Op) -> Any:
        if op.kind == "get":
            return await self.get(op.key)
        if op.kind == "samples":
            return await self.samples(op.key)
        if op.kind == "set":
            return await self.set(op.key, op.value, ttl_s=op.ttl_s)
        if op.kind == "raise_to":
            if as_number(await self.get(op.key)) >= op.number:
                return False
            await self.set(op.key, op.value, ttl_s=op.ttl_s)
            return True
        if op.kind == "delete":
            return await self.delete(op.key)
        if op.kind == "incr":
            return await self.incr(op.key, op.amount, ttl_s=op.ttl_s)
        if op.kind == "append":
            for number in op.numbers:
                await self.append_sample(op.key, number, keep=op.keep, ttl_s=op.ttl_s)
            return None
        return await self.publish(op.key, op.value)

    async def publish(self, channel: str, message: str) -> None:  # noqa: B027 - optional hook
        """Send `message` to every `listen`er on `channel` (every replica, on a
        shared store). Delivery is best effort: a listener may miss one."""

    async def listen(self, channel: str, on_message: Callable[[str], None]) -> None:
        """Call `on_message` with each message published on `channel` until
        cancelled; raises when the subscription breaks (the caller resubscribes).
        The default store has no other replica to hear from: it waits."""
        await asyncio.Event().wait()

    def count_round_trips(self, hook: Callable[[str], None]) -> None:  # noqa: B027 - optional hook
        """Call `hook(op)` once per round trip to a shared store (a metric);
        a store in this process makes none."""

    @abstractmethod
    async def status(self) -> StoreStatus:
        """ "ok" when the store holds shared state as configured, else "degraded"."""

    async def reconnect(self) -> None:  # noqa: B027 - optional hook
        """Called when the store answers again after failing: drop connections
        that may be stale. The default has none."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
