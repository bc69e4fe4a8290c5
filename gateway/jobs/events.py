"""Following a job's changes: what `GET /v1/images/jobs/{id}/events` streams.

`follow` yields the job object at each change, with its version (the
event's `id:`), oldest first, and ends after the first terminal state. It
reads the store's event log (gateway/jobs/store.py), which every write that
changes the job object appends to in the same transaction as the record, so
a job run on one replica and watched through another is seen change by
change, and a watcher that comes back with `Last-Event-ID` gets exactly the
changes after it. Between changes it yields None every KEEPALIVE_S, for the
keep-alive comment that keeps proxies from closing an idle connection.

A stream lasts at most until the job's deadline plus STREAM_GRACE_S (counted
from its creation, like the deadline; a job settles its provider's bill after
its deadline), never longer than the record's retention, and at least
MIN_STREAM_S so a watcher that reconnects late gets a calm stream rather than
a tight reconnect loop. Nothing outlives a watcher: its only wait is the
store call it is in, and a cancelled watcher leaves that call at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from gateway.jobs.model import TERMINAL, JobRecord
from gateway.jobs.store import JobEvent, JobStore

KEEPALIVE_S = 15.0
STREAM_GRACE_S = 120.0
MIN_STREAM_S = 30.0


def stream_end(record: JobRecord, retention_s: float, now: float) -> float:
    """The unix time a stream of this job ends by, terminal or not."""
    deadline_s = float(record.job.get("deadline_s") or 0.0)
    end = min(record.created + deadline_s + STREAM_GRACE_S, record.created + retention_s)
    return max(end, min(now + MIN_STREAM_S, record.created + retention_s))


def caught_up(record: JobRecord, last_event_id: int | None) -> bool:
    """A watcher that already holds the job's last state: a terminal job at or
    before its `Last-Event-ID` has nothing more to send."""
    return last_event_id is not None and record.terminal and last_event_id >= record.version


async def follow(
    store: JobStore,
    record: JobRecord,
    last_event_id: int | None,
    *,
    keepalive_s: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[JobEvent | None]:
    """The job's changes after `last_event_id` (without one: its state now,
    then its changes), None for a keep-alive; ends after a terminal state, at
    the stream's end (`stream_end`), when `stop()` says so (the process is
    draining) or when the record is gone."""
    keepalive_s = KEEPALIVE_S if keepalive_s is None else keepalive_s
    ends_at = stream_end(record, store.retention_s, clock())
    if last_event_id is None:
        yield record.version, record.public()  # its state now, at its version: the log past that version holds exactly what follows
        if record.terminal:
            return
        last = record.version
    else:
        if caught_up(record, last_event_id):
            return
        last = min(last_event_id, record.version)  # an id past the record's version was never ours: follow from now
        if last < record.version and not await store.events(record.id, last, 0.0):
            # Nothing logged past it (written before the log existed, or trimmed): the state now stands for what was missed.
            yield record.version, record.public()
            if record.terminal:
                return
            last = record.version
    quiet_until = time.monotonic() + keepalive_s
    while not stop():
        remaining = ends_at - clock()
        if remaining <= 0:
            return
        wait = min(quiet_until - time.monotonic(), remaining, store.max_wait_s)
        found = await store.events(record.id, last, max(0.0, wait))
        for version, job in found:
            yield version, job
            last = version
            if job.get("status") in TERMINAL:
                return
        if found:
            quiet_until = time.monotonic() + keepalive_s
        elif time.monotonic() >= quiet_until:
            if await store.get(record.id) is None:  # expired or gone: nothing more will come
                return
            yield None
            quiet_until = time.monotonic() + keepalive_s
