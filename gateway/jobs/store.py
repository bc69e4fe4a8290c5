"""Where job records live: this process's memory, or Redis shared by every replica.

Both keep a record for the retention period (24 h by default) and an index
per owner, so listing is a range over time-ordered ids. Updates are
read-modify-write under a lock (memory) or an optimistic WATCH/MULTI
transaction (Redis), so a cancel on one replica and a worker finishing on
another cannot overwrite each other's status.

Every write counts in the record's `version` (1 when created). A write that
changes the public job object, up to and including the first terminal state,
also appends that object to the job's event log, in the same lock or
transaction as the record, so a watcher (gateway/jobs/events.py) reads every
change in order, without a gap, from any version on: a list beside the record
and an asyncio.Event per waiting watcher (memory), or a Redis stream
`klein:<ns>:job-events:<id>` whose entry ids are the versions, read with a
blocking XREAD (Redis).
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from gateway.jobs.model import ID_PREFIX, JobRecord
from gateway.jobs.queue import JobQueue

Change = Callable[[JobRecord], bool]  # edits the record in place; False: nothing to write
JobEvent = tuple[int, dict[str, Any]]  # (version, the public job object as that write left it)
MAX_EVENTS = 100  # a job's event log keeps its last this many changes (a job makes a handful: queued, running, one per attempt, its end)


def _written(record: JobRecord, before: dict[str, Any], was_terminal: bool) -> str | None:
    """Count a write in the record's version; the event to log (JSON), None when
    the public job object did not change or the job had already ended."""
    record.version += 1
    if was_terminal:
        return None
    after = record.public()
    return None if after == before else json.dumps(after)


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
    async def create_queued(self, record: JobRecord, queue: JobQueue) -> bool:
        """Store the record and queue it as one step, unless a record of that id
        exists: False then, and nothing is written. How a batch line's job is
        made exactly once by whichever replica drives the batch, with no moment
        where the record exists and its queue entry does not."""

    @abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def update(self, job_id: str, change: Change) -> JobRecord | None:
        """Apply `change` atomically; the record as it now is (None if gone)."""

    async def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        return [await self.get(job_id) for job_id in job_ids]

    @abstractmethod
    async def events(self, job_id: str, after: int, wait_s: float) -> list[JobEvent]:
        """The job's logged changes with a version over `after`, oldest first;
        when there are none yet, waits up to `wait_s` for one. [] when none came."""

    @property
    @abstractmethod
    def subscribers(self) -> int:
        """Watchers of this process waiting on `events` now."""

    # The longest one `events` call waits: a watcher looks at its cap and at
    # the process's drain at least this often, so a stopping replica's streams end within it.
    max_wait_s = 3.0

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
                if record is not None and record.owner == owner and record.batch is None and (status is None or record.status == status):
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
        self._events: dict[str, list[tuple[int, str]]] = {}  # id -> [(version, public JSON)], kept as long as the record
        self._waiters: dict[str, set[asyncio.Event]] = {}  # id -> one event per watcher waiting for its next change
        self._lock = asyncio.Lock()

    def _expire(self) -> None:
        now = self.clock()
        for job_id in [k for k, (exp, _) in self._records.items() if exp <= now]:
            del self._records[job_id]
            self._events.pop(job_id, None)
        oldest = cutoff_id(self.retention_s, now)
        for owner, ids in self._owners.items():
            self._owners[owner] = [i for i in ids if i >= oldest]

    async def create(self, record: JobRecord) -> None:
        async with self._lock:
            self._create(record)

    def _create(self, record: JobRecord) -> None:
        self._expire()
        record.version = 1
        self._records[record.id] = (self.clock() + self.retention_s, json.dumps(record.to_json()))
        self._owners.setdefault(_owner_key(record.owner), []).append(record.id)
        self._log(record.id, record.version, json.dumps(record.public()))

    async def create_queued(self, record: JobRecord, queue: JobQueue) -> bool:
        async with self._lock:
            if record.id in self._records:
                return False
            self._create(record)
            await queue.enqueue(record.id)  # one process: nothing between the two can outlive it
        return True

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
            before, was_terminal = record.public(), record.terminal
            if change(record):
                event = _written(record, before, was_terminal)
                self._records[job_id] = (self._records[job_id][0], json.dumps(record.to_json()))
                if event is not None:
                    self._log(job_id, record.version, event)
            return record

    def _log(self, job_id: str, version: int, event: str) -> None:
        log = self._events.setdefault(job_id, [])
        log.append((version, event))
        del log[:-MAX_EVENTS]
        for waiter in self._waiters.get(job_id, ()):
            waiter.set()

    def _after(self, job_id: str, after: int) -> list[JobEvent]:
        if job_id not in self._records:
            return []
        return [(version, json.loads(event)) for version, event in self._events.get(job_id, ()) if version > after]

    async def events(self, job_id: str, after: int, wait_s: float) -> list[JobEvent]:
        found = self._after(job_id, after)
        if found or wait_s <= 0:
            return found
        changed = asyncio.Event()
        waiters = self._waiters.setdefault(job_id, set())
        waiters.add(changed)
        try:
            async with asyncio.timeout(wait_s):
                await changed.wait()
        except TimeoutError:
            return []
        finally:
            waiters.discard(changed)
            if not waiters:
                del self._waiters[job_id]
        return self._after(job_id, after)

    @property
    def subscribers(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    async def ids(self, owner: str | None, *, before: str | None, limit: int) -> list[str]:
        ids = sorted(self._owners.get(_owner_key(owner), []), reverse=True)
        if before is not None:
            ids = [i for i in ids if i < before]
        return ids[:limit]


class RedisJobStore(JobStore):
    """Jobs in Redis: `klein:<ns>:job:<id>` (JSON, expiring) and a
    per-owner sorted set of ids (`klein:<ns>:jobs:by-owner:<owner>`)."""

    # One blocking XREAD waits at most max_wait_s (3 s): under the client's 5 s
    # socket timeout (gateway/jobs/service.py), which would otherwise cut it off.

    def __init__(self, client: Any, *, namespace: str, retention_s: float) -> None:
        super().__init__(retention_s)
        self._client = client
        self._prefix = f"klein:{namespace}:"
        self._reading = 0

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self._prefix}job-events:{job_id}"

    def _log(self, pipe: Any, job_id: str, version: int, event: str) -> None:
        """Append an event in the pipeline's transaction; the log expires with
        the retention from its last change (a little after the record)."""
        key = self._events_key(job_id)
        pipe.xadd(key, {"job": event}, id=f"{version}-0", maxlen=MAX_EVENTS, approximate=False)
        pipe.pexpire(key, int(self.retention_s * 1000))

    def _index(self, owner: str | None) -> str:
        return f"{self._prefix}jobs:by-owner:{_owner_key(owner)}"

    async def create(self, record: JobRecord) -> None:
        index = self._index(record.owner)
        record.version = 1
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record.id), json.dumps(record.to_json()), px=int(self.retention_s * 1000))
            self._log(pipe, record.id, record.version, json.dumps(record.public()))
            pipe.zadd(index, {record.id: 0})
            pipe.zremrangebylex(index, "-", f"({cutoff_id(self.retention_s)}")
            pipe.pexpire(index, int(self.retention_s * 1000))
            await pipe.execute()

    # SET NX, then (only if it set) the event log, the owner index and the queue entry, in one step.
    _CREATE_QUEUED = """
    if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], ARGV[3] .. '-0', 'job', ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
    redis.call('ZADD', KEYS[3], 0, ARGV[5])
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
    redis.call('XADD', KEYS[4], '*', 'job', ARGV[5])
    return 1
    """

    async def create_queued(self, record: JobRecord, queue: JobQueue) -> bool:
        stream = await queue.stream_for_script()
        record.version = 1
        keys = [self._key(record.id), self._events_key(record.id), self._index(record.owner), stream]
        args = [json.dumps(record.to_json()), int(self.retention_s * 1000), record.version, json.dumps(record.public()), record.id, MAX_EVENTS]
        return bool(await self._client.eval(self._CREATE_QUEUED, len(keys), *keys, *args))

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
                    before, was_terminal = record.public(), record.terminal
                    if not change(record):
                        await pipe.unwatch()
                        return record
                    event = _written(record, before, was_terminal)
                    pipe.multi()
                    pipe.set(key, json.dumps(record.to_json()), keepttl=True)
                    if event is not None:
                        self._log(pipe, job_id, record.version, event)
                    await pipe.execute()
                    return record
                except WatchError:
                    continue
        raise RuntimeError(f"job {job_id} changed 50 times while being updated")

    async def events(self, job_id: str, after: int, wait_s: float) -> list[JobEvent]:
        """XREAD from `<after>-0`: what is logged past it at once, else a
        blocking read that Redis answers as soon as an update appends."""
        block = int(min(wait_s, self.max_wait_s) * 1000)
        self._reading += 1
        try:
            reply = await self._client.xread({self._events_key(job_id): f"{max(0, after)}-0"}, count=MAX_EVENTS, block=block if block > 0 else None)
        finally:
            self._reading -= 1
        found: list[JobEvent] = []
        streams = reply.items() if isinstance(reply, dict) else reply or ()  # RESP3 answers a map, RESP2 a list of pairs
        for _key, entries in streams:
            for entry_id, fields in entries:
                found.append((int(str(entry_id).split("-")[0]), json.loads(fields["job"])))
        return found

    @property
    def subscribers(self) -> int:
        return self._reading

    async def ids(self, owner: str | None, *, before: str | None, limit: int) -> list[str]:
        upper = f"({before}" if before else "+"
        return list(await self._client.zrevrangebylex(self._index(owner), upper, f"[{cutoff_id(self.retention_s)}", start=0, num=limit))
