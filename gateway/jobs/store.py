"""Where job records live: this process's memory, or Redis shared by every replica.

Both keep a record for the retention period (24 h by default) and an index
per owner, so listing is a range over time-ordered ids. Updates are
read-modify-write under a lock (memory) or an optimistic WATCH/MULTI
transaction (Redis), so a cancel on one replica and a worker finishing on
another cannot overwrite each other's status.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from gateway.jobs.model import ID_PREFIX, JobRecord

Change = Callable[[JobRecord], bool]  # edits the record in place; False: nothing to write


def cutoff_id(retention_s: float, now: float | None = None) -> str:
    """The smallest id a job created within the retention period can have."""
    ms = int(((time.time() if now is None else now) - retention_s) * 1000)
    return f"{ID_PREFIX}{max(0, ms):012x}"


class JobStore(ABC):
    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s

    @abstractmethod
    async def create(self, record: JobRecord) -> None: ...

    @abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def update(self, job_id: str, change: Change) -> JobRecord | None:
        """Apply `change` atomically; the record as it now is (None if gone)."""

    async def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        return [await self.get(job_id) for job_id in job_ids]

    @abstractmethod
    async def ids(self, owner: str | None, *, before: str | None, limit: int) -> list[str]:
        """The owner's job ids, newest first, older than `before` when given."""

    async def list(self, owner: str | None, *, status: str | None, limit: int, after: str | None) -> tuple[list[JobRecord], bool]:
        """The owner's jobs, newest first, after the cursor; and whether more follow."""
        found: list[JobRecord] = []
        cursor = after
        while len(found) <= limit:
            batch = await self.ids(owner, before=cursor, limit=max(limit * 2, 20))
            if not batch:
                break
            for record in await self.get_many(batch):
                if record is not None and record.owner == owner and (status is None or record.status == status):
                    found.append(record)
            cursor = batch[-1]
        return found[:limit], len(found) > limit

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _owner_key(owner: str | None) -> str:
    return owner or "-"


class MemoryJobStore(JobStore):
    """Jobs in this process only: lost on restart, invisible to other replicas."""

    def __init__(self, retention_s: float, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(retention_s)
        self.clock = clock  # unix seconds; a test's clock shows a record's last readable moment
        self._records: dict[str, tuple[float, str]] = {}  # id -> (expires at, JSON)
        self._owners: dict[str, list[str]] = {}
        self._lock = asyncio.Lock()

    def _expire(self) -> None:
        now = self.clock()
        for job_id in [k for k, (exp, _) in self._records.items() if exp <= now]:
            del self._records[job_id]
        oldest = cutoff_id(self.retention_s, now)
        for owner, ids in self._owners.items():
            self._owners[owner] = [i for i in ids if i >= oldest]

    async def create(self, record: JobRecord) -> None:
        async with self._lock:
            self._expire()
            self._records[record.id] = (self.clock() + self.retention_s, json.dumps(record.to_json()))
            self._owners.setdefault(_owner_key(record.owner), []).append(record.id)

    async def get(self, job_id: str) -> JobRecord | None:
        entry = self._records.get(job_id)
        if entry is None or entry[0] <= self.clock():
            return None
        return JobRecord.from_json(json.loads(entry[1]))

    async def update(self, job_id: str, change: Change) -> JobRecord | None:
        async with self._lock:
            record = await self.get(job_id)
            if record is None:
                return None
            if change(record):
                self._records[job_id] = (self._records[job_id][0], json.dumps(record.to_json()))
            return record

    async def ids(self, owner: str | None, *, before: str | None, limit: int) -> list[str]:
        ids = sorted(self._owners.get(_owner_key(owner), []), reverse=True)
        if before is not None:
            ids = [i for i in ids if i < before]
        return ids[:limit]


class RedisJobStore(JobStore):
    """Jobs in Redis: `klein:<ns>:job:<id>` (JSON, expiring) and a
    per-owner sorted set of ids (`klein:<ns>:jobs:by-owner:<owner>`)."""

    def __init__(self, client: Any, *, namespace: str, retention_s: float) -> None:
        super().__init__(retention_s)
        self._client = client
        self._prefix = f"klein:{namespace}:"

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _index(self, owner: str | None) -> str:
        return f"{self._prefix}jobs:by-owner:{_owner_key(owner)}"

    async def create(self, record: JobRecord) -> None:
        index = self._index(record.owner)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record.id), json.dumps(record.to_json()), px=int(self.retention_s * 1000))
            pipe.zadd(index, {record.id: 0})
            pipe.zremrangebylex(index, "-", f"({cutoff_id(self.retention_s)}")
            pipe.pexpire(index, int(self.retention_s * 1000))
            await pipe.execute()

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._client.get(self._key(job_id))
        return JobRecord.from_json(json.loads(raw)) if raw else None

    async def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        if not job_ids:
            return []
        raws = await self._client.mget([self._key(i) for i in job_ids])
        return [JobRecord.from_json(json.loads(raw)) if raw else None for raw in raws]

    async def update(self, job_id: str, change: Change) -> JobRecord | None:
        from redis.exceptions import WatchError

        key = self._key(job_id)
        for _ in range(50):
            async with self._client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if not raw:
                        return None
                    record = JobRecord.from_json(json.loads(raw))
                    if not change(record):
                        await pipe.unwatch()
                        return record
                    pipe.multi()
                    pipe.set(key, json.dumps(record.to_json()), keepttl=True)
                    await pipe.execute()
                    return record
                except WatchError:
                    continue
        raise RuntimeError(f"job {job_id} changed 50 times while being updated")

    async def ids(self, owner: str | None, *, before: str | None, limit: int) -> list[str]:
        upper = f"({before}" if before else "+"
        return list(await self._client.zrevrangebylex(self._index(owner), upper, f"[{cutoff_id(self.retention_s)}", start=0, num=limit))
