"""Async jobs, assembled: the store, the queue, the webhook schedule and rules.

`open_jobs` picks memory (one process; lost on restart) or Redis
(`REDIS_URL`, shared by every replica). The API calls `submit`, `owned`,
`list` and `cancel`; the worker (gateway/jobs/worker.py) does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.config import GatewaySettings
from gateway.domain.errors import GatewayError
from gateway.jobs.deliveries import (
    DeliverySchedule,
    MemoryDeliverySchedule,
    RedisDeliverySchedule,
)
from gateway.jobs.model import JobRecord
from gateway.jobs.queue import JobQueue, MemoryJobQueue, RedisJobQueue
from gateway.jobs.store import JobStore, MemoryJobStore, RedisJobStore
from gateway.jobs.webhooks import Allowlist, parse_secret
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.dispatch.fleet import BackendFleet
    from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger("gateway.jobs")

CANCEL_WAIT_S = 3.0  # how long a cancel's answer waits for a running job to end


class JobNotQueued(GatewayError):
    """The record was stored but the queue write failed: the gateway's fault, retryable."""

    status = 503
    type = "server_error"
    code = "job_not_queued"


@contextlib.contextmanager
def store_reachable() -> Iterator[None]:
    """A job store outage is a 503 the caller may retry, not an internal error."""
    try:
        yield
    except GatewayError:
        raise
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise GatewayError("the job store is unavailable; retry shortly", status=503, code="job_store_unavailable", retryable=True, retry_after=1) from exc
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            raise GatewayError("the job store is unavailable; retry shortly", status=503, code="job_store_unavailable", retryable=True, retry_after=1) from exc
        raise


@dataclass
class Jobs:
    store: JobStore
    queue: JobQueue
    deliveries: DeliverySchedule
    settings: GatewaySettings
    allowlist: Allowlist
    signing_key: bytes | None  # None: KLEIN_WEBHOOK_SECRET unset, so webhooks are refused
    shared: bool  # True when every replica sees the same jobs (Redis)
    client: Any = None  # the Redis client, closed with the jobs
    on_cancel: Callable[[JobRecord], None] | None = None  # this replica's worker, told at once of a cancel of a running job

    async def submit(self, record: JobRecord, metrics: GatewayMetrics) -> None:
        """Store the record, then queue it. The record comes first so that a
        worker never claims a job it cannot read (it would drop the message);
        a queue write that fails then marks the record failed
        (`job_not_queued`) and answers 503, so no job is listed as `queued`
        with nothing in the queue to run it."""
        with store_reachable():
            await self.store.create(record)
        try:
            await self.queue.enqueue(record.id)
        except Exception as exc:  # any failure to queue leaves the record unrunnable; it re-raises as a 503
            err = JobNotQueued("the job could not be queued; retry shortly", retryable=True, retry_after=1)
            await self._not_queued(record.id, err, type(exc).__name__)
            metrics.record_job_status("failed")
            raise err from exc
        metrics.record_job_status("queued")

    async def _not_queued(self, job_id: str, err: GatewayError, cause: str) -> None:
        """Mark a job that never reached the queue failed, with the caller's error."""
        error = err.envelope()["error"]

        def fail(r: JobRecord) -> bool:
            if r.terminal:
                return False
            r.status, r.completed, r.error = "failed", time.time(), error
            return True

        try:
            await self.store.update(job_id, fail)
        except Exception as exc:  # noqa: BLE001 - the store failed too: nothing more can be written now
            log.error("job %s could not be queued (%s) nor marked failed (%s); it is left to expire with the retention", job_id, cause, type(exc).__name__)
        else:
            log.warning("job %s could not be queued (%s); marked failed", job_id, cause)

    async def owned(self, owner: str | None, job_id: str) -> JobRecord | None:
        """The job if `owner` made it; None otherwise, the same as when it does not exist."""
        with store_reachable():
            record = await self.store.get(job_id)
        return record if record is not None and record.owner == owner else None

    async def cancel(self, owner: str | None, job_id: str, fleet: BackendFleet, metrics: GatewayMetrics, *, wait_s: float = CANCEL_WAIT_S) -> JobRecord | None:
        """Cancel a job. A queued one ends `canceled` at once: nothing was spent.
        A running one is marked `cancel_requested_at` and its worker stops it
        without losing money (JobWorker._stop): it ends `canceled` once what its
        provider jobs cost is settled. The answer waits up to CANCEL_WAIT_S
        for that end, so a cancel that is free (before any provider call, or a
        provider job still queued) answers `canceled`; one whose provider job
        runs on answers `running` with `cancel_requested_at`. A batch's driver
        cancelling its lines passes `wait_s=0`: it reads their ends itself."""
        ended: list[str] = []

        def cancel(r: JobRecord) -> bool:
            if r.owner != owner or r.terminal:
                return False
            if r.status == "queued":
                r.status, r.completed = "canceled", time.time()
                ended.append("canceled")
                return True
            if r.cancel_requested is not None:
                return False
            r.cancel_requested = time.time()
            ended.append("requested")
            return True

        if await self.owned(owner, job_id) is None:
            return None
        with store_reachable():
            record = await self.store.update(job_id, cancel)
        if record is None or record.owner != owner:
            return None
        if ended == ["canceled"]:
            metrics.record_job_status("canceled")
            await self.schedule_webhook(record)
            return record
        if ended and self.on_cancel is not None:
            self.on_cancel(record)
        waited = time.monotonic() + wait_s
        while not record.terminal and time.monotonic() < waited:
            await asyncio.sleep(0.05)
            with store_reachable():
                record = await self.store.get(job_id) or record
        return record

    async def list(self, owner: str | None, *, status: str | None, limit: int, after: str | None) -> tuple[list[JobRecord], bool]:
        with store_reachable():
            return await self.store.list(owner, status=status, limit=limit, after=after)

    async def schedule_webhook(self, record: JobRecord) -> None:
        if record.webhook is not None and not record.webhook.delivered:
            await self.deliveries.at(record.id, time.time())

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def open_jobs(settings: GatewaySettings, env: Mapping[str, str]) -> Jobs:
    """Jobs in Redis when `REDIS_URL` is set, else in this process."""
    environment = Settings.from_env(env)
    allow = Allowlist.parse([*settings.webhook_allow, *(environment.webhook_allow or "").split(",")])
    secret = environment.webhook_secret
    key = parse_secret(secret) if secret else None
    url = environment.redis_url
    if not url:
        return Jobs(MemoryJobStore(settings.job_retention_s), MemoryJobQueue(), MemoryDeliverySchedule(), settings, allow, key, shared=False)
    import redis.asyncio as aioredis

    namespace = environment.state_namespace or "default"
    # Longer timeouts than the health store's: XREADGROUP blocks for a second.
    client = aioredis.from_url(url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30)
    return Jobs(
        RedisJobStore(client, namespace=namespace, retention_s=settings.job_retention_s),
        RedisJobQueue(client, namespace=namespace),
        RedisDeliverySchedule(client, namespace=namespace),
        settings,
        allow,
        key,
        shared=True,
        client=client,
    )
