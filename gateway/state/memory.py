"""In-process state: the default, zero set-up, and Redis's stand-in when it fails.

Single event loop, no awaits inside an operation, so every operation is
atomic without locks. Expired entries are dropped when read and swept every
few hundred writes, so the dict stays bounded by what is live.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence

from gateway.state.base import StateStore, StoreStatus

_SWEEP_EVERY = 500


class MemoryStore(StateStore):
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # for TTLs only: real elapsed time
        self._data: dict[str, tuple[str | deque[float], float]] = {}
        self._writes = 0
        self._listeners: dict[str, list[Callable[[str], None]]] = {}

    # ---- internals -----------------------------------------------------------

    def _live(self, key: str) -> str | deque[float] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        return value

    def _put(self, key: str, value: str | deque[float], ttl_s: float) -> None:
        self._data[key] = (value, self._clock() + max(ttl_s, 0.001))
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self.sweep()

    def _string(self, key: str) -> str | None:
        value = self._live(key)
        return value if isinstance(value, str) else None

    def sweep(self) -> int:
        """Drop every expired entry; returns how many went."""
        now = self._clock()
        dead = [k for k, (_, expires) in self._data.items() if expires <= now]
        for k in dead:
            del self._data[k]
        return len(dead)

    def mirror(self, items: Iterable[tuple[str, str | None]], *, ttl_s: float, keep: Container[str] = ()) -> None:
        """Copy what a shared store answered: values are set (an identical value
        keeps its longer expiry), absent keys dropped unless in `keep`.
        Synchronous and without a write per key: it runs on every shared read."""
        data, expires, added = self._data, self._clock() + max(ttl_s, 0.001), 0
        for key, value in items:
            if value is None:
                if key not in keep:
                    data.pop(key, None)
                continue
            current = data.get(key)
            if current is not None and current[0] == value and current[1] >= expires:
                continue
            data[key] = (value, expires)
            added += 1
        if added:
            before, self._writes = self._writes, self._writes + added
            if before // _SWEEP_EVERY != self._writes // _SWEEP_EVERY:
                self.sweep()

    def export(self, key: str) -> tuple[str, float] | None:
        """A string value with its remaining TTL, for pushing back to a shared store."""
        value = self._string(key)
        if value is None:
            return None
        return value, self._data[key][1] - self._clock()

    def __len__(self) -> int:
        return len(self._data)

    # ---- StateStore ----------------------------------------------------------

    async def get(self, key: str) -> str | None:
        return self._string(key)

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        return [self._string(k) for k in keys]

    async def set(self, key: str, value: str, *, ttl_s: float) -> None:
        self._put(key, value, ttl_s)

    async def set_if_absent(self, key: str, value: str, *, ttl_s: float) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl_s)
        return True

    async def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float) -> bool:
        if self._string(key) != expected:
            return False
        self._put(key, value, ttl_s)
        return True

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def compare_and_delete(self, key: str, expected: str) -> bool:
        if self._string(key) != expected:
            return False
        del self._data[key]
        return True

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float) -> int:
        current = self._string(key)
        value = (int(current) if current is not None else 0) + amount
        self._put(key, str(value), ttl_s)
        return value

    async def append_sample(self, key: str, value: float, *, keep: int, ttl_s: float) -> None:
        current = self._live(key)
        if not isinstance(current, deque) or current.maxlen != keep:
            current = deque(current if isinstance(current, deque) else (), maxlen=keep)
        current.appendleft(float(value))
        self._put(key, current, ttl_s)

    async def samples(self, key: str) -> list[float]:
        current = self._live(key)
        return list(current) if isinstance(current, deque) else []

    async def publish(self, channel: str, message: str) -> None:
        """Delivered at once to this process's listeners (trackers sharing this store)."""
        for on_message in list(self._listeners.get(channel, ())):
            on_message(message)

    async def listen(self, channel: str, on_message: Callable[[str], None]) -> None:
        listeners = self._listeners.setdefault(channel, [])
        listeners.append(on_message)
        try:
            await asyncio.Event().wait()
        finally:
            listeners.remove(on_message)

    async def status(self) -> StoreStatus:
        return "ok"
