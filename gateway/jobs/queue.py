"""The work queue of async jobs: Redis Streams consumer groups, or memory.

Redis Streams give what a durable job queue needs with no new dependency:
XADD enqueues; XREADGROUP hands each entry to one consumer of the group and
keeps it in that consumer's pending list until XACK; an entry whose consumer
stopped touching it for the visibility timeout is taken over with XAUTOCLAIM
by any other replica. A live worker refreshes its claim (XCLAIM ... JUSTID
resets the idle time), so a long job is never taken from a replica that is
still working on it.

The memory queue is an asyncio queue in this process: work queued there is
lost when the process stops, and other replicas never see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    id: str  # the queue's own id for this delivery
    job_id: str


class JobQueue(ABC):
    @abstractmethod
    async def enqueue(self, job_id: str) -> None: ...

    @abstractmethod
    async def claim(self, consumer: str, *, block_s: float) -> Message | None:
        """The next queued job for `consumer`, waiting up to `block_s`."""

    @abstractmethod
    async def reclaim(self, consumer: str, *, idle_s: float, count: int) -> list[Message]:
        """Jobs whose worker has been silent for `idle_s` (it died), now `consumer`'s."""

    @abstractmethod
    async def touch(self, consumer: str, message_ids: list[str]) -> None:
        """Refresh `consumer`'s claim on work it is still doing."""

    @abstractmethod
    async def ack(self, message: Message) -> None:
        """The job is settled: remove it from the queue for good."""

    async def stream_for_script(self) -> str:
        """The Redis stream a script may XADD a job to (its group made first); only a Redis queue has one."""
        raise TypeError(f"{type(self).__name__} has no Redis stream")

    @abstractmethod
    async def depth(self) -> tuple[int, float]:
        """Jobs waiting for a worker, and the age in seconds of the oldest of them."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class MemoryJobQueue(JobQueue):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self._waiting: deque[float] = deque()
        self._seq = 0

    async def enqueue(self, job_id: str) -> None:
        now = time.time()
        self._waiting.append(now)
        await self._queue.put((job_id, now))

    async def claim(self, consumer: str, *, block_s: float) -> Message | None:
        try:
            job_id, _ = await asyncio.wait_for(self._queue.get(), block_s)
        except TimeoutError:
            return None
        with contextlib.suppress(IndexError):
            self._waiting.popleft()
        self._seq += 1
        return Message(str(self._seq), job_id)

    async def reclaim(self, consumer: str, *, idle_s: float, count: int) -> list[Message]:
        return []  # one process: nobody else's work to take over

    async def touch(self, consumer: str, message_ids: list[str]) -> None:
        return None

    async def ack(self, message: Message) -> None:
        return None

    async def depth(self) -> tuple[int, float]:
        oldest = self._waiting[0] if self._waiting else None
        return len(self._waiting), (time.time() - oldest) if oldest is not None else 0.0


class RedisJobQueue(JobQueue):
    """One stream, `klein:<ns>:jobs:queue`, and one consumer group, `workers`."""

    GROUP = "workers"

    def __init__(self, client: Any, *, namespace: str) -> None:
        self._client = client
        self._stream = f"klein:{namespace}:jobs:queue"
        self._ready = False

    async def _group(self) -> None:
        if self._ready:
            return
        from redis.exceptions import ResponseError

        try:
            await self._client.xgroup_create(self._stream, self.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    async def enqueue(self, job_id: str) -> None:
        await self._group()
        await self._client.xadd(self._stream, {"job": job_id})

    async def stream_for_script(self) -> str:
        await self._group()
        return self._stream

    def _lost_group(self, exc: Exception) -> bool:
        """Redis lost the group (restarted without persistence): make it again next time."""
        if "NOGROUP" in str(exc):
            self._ready = False
            return True
        return False

    async def claim(self, consumer: str, *, block_s: float) -> Message | None:
        from redis.exceptions import ResponseError

        await self._group()
        try:
            reply = await self._client.xreadgroup(self.GROUP, consumer, {self._stream: ">"}, count=1, block=max(1, int(block_s * 1000)))
        except ResponseError as exc:
            if self._lost_group(exc):
                return None
            raise
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return Message(entry_id, fields["job"])
        return None

    async def reclaim(self, consumer: str, *, idle_s: float, count: int) -> list[Message]:
        from redis.exceptions import ResponseError

        await self._group()
        try:
            reply = await self._client.xautoclaim(self._stream, self.GROUP, consumer, min_idle_time=int(idle_s * 1000), start_id="0-0", count=count)
        except ResponseError as exc:
            if self._lost_group(exc):
                return []
            raise
        entries = reply[1] if reply else []
        return [Message(entry_id, fields["job"]) for entry_id, fields in entries if fields and "job" in fields]

    async def touch(self, consumer: str, message_ids: list[str]) -> None:
        if message_ids:
            await self._client.xclaim(self._stream, self.GROUP, consumer, min_idle_time=0, message_ids=message_ids, justid=True)

    async def ack(self, message: Message) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, self.GROUP, message.id)
            pipe.xdel(self._stream, message.id)
            await pipe.execute()

    async def depth(self) -> tuple[int, float]:
        await self._group()
        groups = await self._client.xinfo_groups(self._stream)
        group = next((g for g in groups if g.get("name") == self.GROUP), None)
        if group is None:
            return 0, 0.0
        lag = group.get("lag")
        last = group.get("last-delivered-id") or "0-0"
        waiting = await self._client.xrange(self._stream, min=f"({last}", max="+", count=1)
        if lag is None:  # Redis < 7: count what follows the last delivered entry
            lag = len(await self._client.xrange(self._stream, min=f"({last}", max="+"))
        if not waiting:
            return int(lag or 0), 0.0
        enqueued_ms = int(waiting[0][0].split("-")[0])
        return int(lag or 0), max(0.0, time.time() - enqueued_ms / 1000)
