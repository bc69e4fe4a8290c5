"""When each pending webhook delivery is due, shared by replicas.

A sorted set of job ids scored by the instant the next try is due. Taking
due work moves its score a lease ahead in the same atomic step (a Lua
script), so exactly one replica tries a delivery at a time, and a delivery
whose replica died comes due again when the lease runs out: at-least-once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

_TAKE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return due
"""


class DeliverySchedule(ABC):
    @abstractmethod
    async def at(self, job_id: str, when: float) -> None:
        """Try the job's webhook at unix time `when` (replacing any earlier plan)."""

    @abstractmethod
    async def take(self, *, lease_s: float, count: int) -> list[str]:
        """Job ids due now, leased to the caller for `lease_s`."""

    @abstractmethod
    async def done(self, job_id: str) -> None: ...


class MemoryDeliverySchedule(DeliverySchedule):
    def __init__(self) -> None:
        self._due: dict[str, float] = {}

    async def at(self, job_id: str, when: float) -> None:
        self._due[job_id] = when

    async def take(self, *, lease_s: float, count: int) -> list[str]:
        now = time.time()
        due = sorted((w, j) for j, w in self._due.items() if w <= now)[:count]
        for _, job_id in due:
            self._due[job_id] = now + lease_s
        return [j for _, j in due]

    async def done(self, job_id: str) -> None:
        self._due.pop(job_id, None)


class RedisDeliverySchedule(DeliverySchedule):
    def __init__(self, client: Any, *, namespace: str) -> None:
        self._client = client
        self._key = f"klein:{namespace}:webhooks:due"
        self._take = client.register_script(_TAKE)

    async def at(self, job_id: str, when: float) -> None:
        await self._client.zadd(self._key, {job_id: when})

    async def take(self, *, lease_s: float, count: int) -> list[str]:
        now = time.time()
        return list(await self._take(keys=[self._key], args=[now, now + lease_s, count]))

    async def done(self, job_id: str) -> None:
        await self._client.zrem(self._key, job_id)
