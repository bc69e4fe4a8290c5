"""Spend budgets per key and window, reserved before work and settled after it.

A request first reserves its worst case in every window its key has (UTC day,
UTC calendar month): the check "spent + reserved + this <= limit" and the add
happen in one step, so concurrent requests on any number of replicas can never
take a window over its limit. Given several worst cases (a plan with fewer
fallbacks costs less at worst), the largest that fits is reserved, still in
one step. When the request ends it settles: the
difference between the reservation and what it really cost is added back (a
negative adjustment releases the unused part).

Money is counted in integer units of 1e-8 USD (the gateway's quantum), so the
store's arithmetic is exact: Redis INCRBY and Lua integers, not floats.

Stores: `MemoryBudgets` (one process, under a lock) and `RedisBudgets` (one
Lua EVAL per reservation). There is no silent fallback from Redis to memory:
a memory fallback would let each replica spend the whole budget, so when
Redis is away a budgeted key's requests are refused with a retryable 503.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Protocol

from gateway.routing.pricing import USD_QUANTUM

WINDOWS = ("day", "month")


def to_units(usd: Decimal) -> int:
    """USD as whole 1e-8 units, rounded up (a reservation never falls short)."""
    return int((usd / USD_QUANTUM).to_integral_value(rounding=ROUND_CEILING))


def from_units(units: int) -> Decimal:
    return Decimal(units) * USD_QUANTUM


@dataclass(frozen=True, slots=True)
class Window:
    """One budget window of one key: `day` 2026-12-01 or `month` 2026-12."""

    name: str
    period: str
    limit_units: int
    resets_at: datetime

    @property
    def limit_usd(self) -> Decimal:
        return from_units(self.limit_units)

    @property
    def ttl_s(self) -> int:
        """How long the store keeps the counter: a day past the reset, for reports."""
        return 86400 + 1


def windows_to_json(windows: list[Window]) -> list[list[str | int]]:
    """Windows as JSON-safe data, for a reservation another process settles (an async job's record)."""
    return [[w.name, w.period, w.limit_units, w.resets_at.isoformat()] for w in windows]


def windows_from_json(data: list[list[str | int]]) -> list[Window]:
    return [Window(str(name), str(period), int(limit), datetime.fromisoformat(str(resets))) for name, period, limit, resets in data]


def windows_at(limits: list[tuple[str, Decimal]], now: datetime) -> list[Window]:
    """The windows in force at `now` (UTC) for a key's `(name, limit)` pairs."""
    now = now.astimezone(UTC)
    out = []
    for name, limit in limits:
        if name == "day":
            period = now.strftime("%Y-%m-%d")
            resets = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        elif name == "month":
            period = now.strftime("%Y-%m")
            resets = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
        else:
            raise ValueError(f"unknown budget window {name!r}")
        out.append(Window(name, period, to_units(limit), resets))
    return out


class BudgetUnavailable(Exception):
    """The shared budget store cannot be reached; nothing was reserved."""


class BudgetStore(Protocol):
    async def reserve(self, key: str, windows: list[Window], units: int) -> Window | None:
        """Add `units` to every window, or to none: returns the window that
        would go over its limit (nothing added), else None (added to all)."""
        ...

    async def reserve_largest(self, key: str, windows: list[Window], options: list[int]) -> tuple[int | None, Window | None]:
        """Reserve the largest of `options` (given largest first) that fits every
        window, in one atomic step: (units reserved, None), or (None, the window
        that refused the smallest option)."""
        ...

    async def settle(self, key: str, windows: list[Window], delta_units: int) -> None:
        """Adjust every window by `delta_units` (actual cost minus reservation)."""
        ...

    async def spent(self, key: str, windows: list[Window]) -> list[int]: ...

    async def close(self) -> None: ...


def _slot(key: str, window: Window) -> str:
    # {key} is a Redis Cluster hash tag: every window of one key is in one slot.
    return f"budget:{{{key}}}:{window.name}:{window.period}"


class MemoryBudgets:
    """Budgets for one process."""

    def __init__(self) -> None:
        self._spent: dict[str, int] = {}
        self._lock = threading.Lock()

    async def reserve(self, key: str, windows: list[Window], units: int) -> Window | None:
        return (await self.reserve_largest(key, windows, [units]))[1]

    async def reserve_largest(self, key: str, windows: list[Window], options: list[int]) -> tuple[int | None, Window | None]:
        refused = None
        with self._lock:
            for units in options:
                refused = next((w for w in windows if self._spent.get(_slot(key, w), 0) + units > w.limit_units), None)
                if refused is None:
                    for w in windows:
                        slot = _slot(key, w)
                        self._spent[slot] = self._spent.get(slot, 0) + units
                    return units, None
        return None, refused

    async def settle(self, key: str, windows: list[Window], delta_units: int) -> None:
        with self._lock:
            for w in windows:
                slot = _slot(key, w)
                self._spent[slot] = max(0, self._spent.get(slot, 0) + delta_units)

    async def spent(self, key: str, windows: list[Window]) -> list[int]:
        with self._lock:
            return [self._spent.get(_slot(key, w), 0) for w in windows]

    async def close(self) -> None:
        return None


# KEYS: one counter per window. ARGV[1]: m, the number of options; ARGV[2..m+1]: the
# options in units, largest first; then per window its limit and TTL (s). Reserves the
# first option that fits every window. Returns {option index, 0}, or {0, the 1-based
# index of the window that refused the last option}.
_RESERVE = """
local m = tonumber(ARGV[1])
local spent = {}
for i, key in ipairs(KEYS) do spent[i] = tonumber(redis.call('GET', key) or '0') end
local refused = 0
for j = 1, m do
  local units = tonumber(ARGV[1 + j])
  refused = 0
  for i = 1, #KEYS do
    if spent[i] + units > tonumber(ARGV[m + 2 * i]) then refused = i break end
  end
  if refused == 0 then
    for i, key in ipairs(KEYS) do
      redis.call('INCRBY', key, units)
      redis.call('EXPIRE', key, tonumber(ARGV[m + 2 * i + 1]))
    end
    return {j, 0}
  end
end
return {0, refused}
"""

# KEYS: the counters. ARGV[1]: delta (may be negative). Never below zero.
_SETTLE = """
local delta = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local now = redis.call('INCRBY', key, delta)
  if now < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end
return 0
"""


class RedisBudgets:
    """Budgets shared by every replica on one Redis."""

    def __init__(self, url: str, *, namespace: str = "default", socket_timeout: float = 1.0, pool_wait_s: float = 2.0, max_connections: int = 128) -> None:
        """Budgets fail closed (a Redis error refuses the request), so the
        timeouts are more patient than the health store's: a busy host must
        not turn into refused requests."""
        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_wait_s,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=True,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._prefix = f"klein:{namespace}:"
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)

    def _keys(self, key: str, windows: list[Window]) -> list[str]:
        return [self._prefix + _slot(key, w) for w in windows]

    def counters(self, key: str, windows: list[Window]) -> list[str]:
        """The Redis keys of `key`'s windows, for a script that settles them with
        another write in the same step (the ledger stream's)."""
        return self._keys(key, windows)

    async def reserve(self, key: str, windows: list[Window], units: int) -> Window | None:
        return (await self.reserve_largest(key, windows, [units]))[1]

    async def reserve_largest(self, key: str, windows: list[Window], options: list[int]) -> tuple[int | None, Window | None]:
        import redis

        if not options:
            raise ValueError("reserve_largest needs at least one option")
        args: list[int] = [len(options), *options]
        for w in windows:
            args += [w.limit_units, max(60, w.ttl_s + int((w.resets_at - datetime.now(UTC)).total_seconds()))]
        try:
            taken, refused = (int(v) for v in await self._reserve(keys=self._keys(key, windows), args=args))
        except (redis.RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from None
        return (options[taken - 1], None) if taken else (None, windows[refused - 1])

    async def settle(self, key: str, windows: list[Window], delta_units: int) -> None:
        import redis

        if delta_units == 0 or not windows:
            return
        try:
            await self._settle(keys=self._keys(key, windows), args=[delta_units])
        except (redis.RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from None

    async def spent(self, key: str, windows: list[Window]) -> list[int]:
        import redis

        try:
            values = await self._client.mget(self._keys(key, windows)) if windows else []
        except (redis.RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from None
        return [int(v or 0) for v in values]

    async def close(self) -> None:
        await self._client.aclose()
