"""The job worker: claims queued jobs, runs them as a synchronous request
would run, records the outcome, and delivers webhooks.

Each replica runs `concurrency` job slots. A job runs through the same
plan, pricing, failover and metrics as a synchronous request
(`Gateway.images`), with the job's own deadline counted from its creation.
Every provider job id an adapter obtains is written to the record at once;
a replica that takes over a job whose worker died follows those provider
jobs (`Adapter.resume`) instead of submitting new paid work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from gateway.dispatch.answer import images_body
from gateway.dispatch.attempts import Attempt, DispatchFailed, Outcome, tried
from gateway.dispatch.produced import bill_produced, produced_megapixels, produced_size
from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob
from gateway.jobs.model import JobRecord
from gateway.jobs.queue import Message
from gateway.jobs.webhooks import check_url, delivery_client, next_delay, signed_headers
from gateway.money.budgets import Window, from_units, to_units, windows_from_json, windows_to_json
from gateway.money.keys import Caller
from gateway.money.tab import OwnerKeyRevoked, Tab
from gateway.net.pinning import AddressRefused, HostUnresolved, Resolver, SystemResolver
from gateway.providers._caller_text import caller_message_of
from gateway.providers.base import FailureClass, ProviderError, job_id_listener
from gateway.redaction import redact
from gateway.routing.pricing import usd

if TYPE_CHECKING:
    from gateway.jobs.pipeline import Pipeline
    from gateway.jobs.service import Jobs

log = logging.getLogger("klein.gateway.jobs")

MAX_BILLED_OVER_QUOTE = 100  # a provider's figure above this many quotes is a fault, not a price
MAX_RUNS = 5  # a job whose worker died this many times is failed, not retried forever
EVENTS = {"succeeded": "image.job.succeeded", "failed": "image.job.failed", "canceled": "image.job.canceled"}


def consumer_name() -> str:
    """This process's name in the consumer group: unique per process start."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def _nothing() -> None:
    return None


def trusted_billed(reported: Decimal | None, quoted: Decimal) -> Decimal | None:
    """A provider's own figure where it is a plausible price, else None (unknown):
    negative, not finite, or more than MAX_BILLED_OVER_QUOTE quotes is a fault."""
    if reported is None or not reported.is_finite() or reported < 0:
        return None
    if reported > quoted * MAX_BILLED_OVER_QUOTE:
        return None
    return usd(reported)


@dataclass
class _Running:
    record_id: str
    message: Message
    task: asyncio.Task[Any]


@dataclass
class JobWorker:
    gw: Pipeline  # the gateway's parts the worker runs jobs through (gateway.service.Gateway in the app)
    jobs: Jobs
    consumer: str = field(default_factory=consumer_name)
    webhook_client: httpx.AsyncClient | None = None  # must connect through a PinnedTransport (start() builds one)
    resolver: Resolver = field(default_factory=SystemResolver)  # webhook hosts, judged on the address connected to
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _running: dict[str, _Running] = field(default_factory=dict)
    _deliveries: set[asyncio.Task[Any]] = field(default_factory=set)
    _stopping: bool = False
    _store_trouble: bool = False  # logged once per outage, not once per slot and second
    _abandoned: bool = False  # past the stop grace: outcomes are left for the replica that takes over

    # ---- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        s = self.jobs.settings
        self.webhook_client = self.webhook_client or delivery_client(self.resolver, self.jobs.allowlist)
        loops = [self._slot(i) for i in range(s.job_concurrency)] + [self._heartbeat(), self._gauges(), self._webhooks()]
        self._tasks = [asyncio.get_running_loop().create_task(loop) for loop in loops]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking work; give running jobs `grace_s`, then leave them to
        another replica (they stay claimed in the queue until the visibility
        timeout passes)."""
        self._stopping = True
        running = [r.task for r in self._running.values()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        self._abandoned = True
        for task in self._tasks:
            task.cancel()
        # A cancel that lands inside a Redis call can come back as the client's
        # own error, which these loops absorb; they also end by `_stopping` at
        # their next turn, and stop waits for them no longer than the grace.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self.webhook_client is not None:
            await self.webhook_client.aclose()

    # ---- claiming ------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        queue, s = self.jobs.queue, self.jobs.settings
        while not self._stopping:
            try:
                taken = await queue.reclaim(self.consumer, idle_s=s.job_visibility_timeout_s, count=1)
                message = taken[0] if taken else await queue.claim(self.consumer, block_s=1.0)
                if message is not None and not self._stopping:
                    await self._handle(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the slot
                if not self._store_trouble:
                    self._store_trouble = True
                    log.warning("job queue or store unreachable (%s); job slots retry every second", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            if self._store_trouble:
                self._store_trouble = False
                log.info("job queue reachable again")

    async def _handle(self, message: Message) -> None:
        store = self.jobs.store
        record = await store.get(message.job_id)
        if record is None or record.terminal:
            await self.jobs.queue.ack(message)
            return
        if record.runs >= MAX_RUNS:
            await self._finish(record.id, "failed", error=GatewayError(f"the job was interrupted {record.runs} times", status=500, code="job_interrupted").envelope()["error"])
            await self.jobs.queue.ack(message)
            return

        def start(r: JobRecord) -> bool:
            if r.terminal:
                return False
            r.status, r.runs = "running", r.runs + 1
            return True

        record = await store.update(record.id, start)
        if record is None or record.terminal:
            await self.jobs.queue.ack(message)
            return
        if record.runs == 1:
            self.gw.metrics.record_job_status("running")
        task = asyncio.get_running_loop().create_task(self._run(record))
        self._running[message.id] = _Running(record.id, message, task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                await self.jobs.queue.ack(message)  # canceled by its owner: settled
                return
            raise  # the process is stopping: the job stays claimed for another replica
        finally:
            if task.done():
                self._running.pop(message.id, None)
        await self.jobs.queue.ack(message)

    async def _heartbeat(self) -> None:
        """Keep this replica's claims fresh, and stop jobs their owners canceled."""
        s = self.jobs.settings
        while not self._stopping:
            await asyncio.sleep(max(0.2, s.job_visibility_timeout_s / 3))
            running = list(self._running.values())
            if not running:
                continue
            with contextlib.suppress(Exception):
                await self.jobs.queue.touch(self.consumer, [r.message.id for r in running])
            for r in running:
                with contextlib.suppress(Exception):
                    current = await self.jobs.store.get(r.record_id)
                    if current is not None and current.status == "canceled" and not r.task.done():
                        r.task.cancel()  # dispatch cancels the provider job where it can

    async def _gauges(self) -> None:
        while not self._stopping:
            with contextlib.suppress(Exception):
                depth, age = await self.jobs.queue.depth()
                self.gw.metrics.set_job_queue(depth=depth, oldest_age_s=age)
            await asyncio.sleep(1.0)

    # ---- running one job -----------------------------------------------------

    async def _run(self, record: JobRecord) -> None:
        job = record.image_job()
        started = time.monotonic() - max(0.0, time.time() - record.created)
        pending: list[asyncio.Task[Any]] = []

        def noted(backend: str, provider_job_id: str) -> None:
            def add(r: JobRecord) -> bool:
                ids = r.provider_jobs.pop(backend, [])
                if provider_job_id not in ids:
                    ids.append(provider_job_id)
                r.provider_jobs[backend] = ids  # last: the attempt in flight now
                return True

            pending.append(asyncio.get_running_loop().create_task(self.jobs.store.update(record.id, add)))

        token = job_id_listener.set(noted)
        extra_cost, extra_attempts = Decimal(0), 0
        status, backend, upstream = 500, None, 0.0
        # The owner's budget is reserved and settled, and the job gets its ledger row, as for a synchronous request.
        # A revoked owner keeps its name on the ledger row of the refusal, never "anonymous".
        caller = self.gw.keyring.named(record.owner)
        tab = self.gw.billing.tab(caller or (Caller(record.owner) if record.owner is not None else None), record.id, f"{record.route}_async")
        tab.job, tab.run = job, max(1, record.runs)  # each run is settled once: its ledger row is (job id, run)
        self._carry_reservation(record, tab)
        outcome: Outcome | None = None
        spent, attempts = Decimal(0), 0
        finish: Callable[[], Awaitable[None]] = _nothing
        try:
            if record.owner is not None and caller is None:
                raise OwnerKeyRevoked(f"the key that submitted this job ({record.owner}) is no longer in force, so the job was not run")
            await tab.ensure_budget_left()
            outcome, extra_cost, extra_attempts = await self._resume(record, job, started, tab)
            if outcome is None:
                outcome = await self.gw.images(job, started=started, base_url=record.base_url, tab=tab, keep_images_s=self._keep_images_s)
            spent, attempts = outcome.cost_usd + extra_cost, outcome.tried + extra_attempts
            backend, upstream, status = outcome.backend, outcome.upstream_s, 200
            body = images_body(job, outcome)
            await self._settle(pending)
            finish = functools.partial(self._finish, record.id, "succeeded", backend=outcome.backend, cost=spent, attempts=attempts, result=body)
        except DispatchFailed as err:
            status, upstream = err.status, err.upstream_s
            spent, attempts = err.cost_usd + extra_cost, tried(err.attempts) + extra_attempts
            await self._settle(pending)
            finish = functools.partial(self._finish, record.id, "failed", cost=spent, attempts=attempts, error=err.envelope()["error"])
        except GatewayError as err:
            status = err.status
            spent, attempts = extra_cost, extra_attempts
            await self._settle(pending)
            finish = functools.partial(self._finish, record.id, "failed", cost=spent, attempts=attempts, error=err.envelope()["error"])
        except asyncio.CancelledError:
            status = 499  # canceled by its owner (or the process is stopping), not a server error
            raise
        finally:
            job_id_listener.reset(token)
            images = len(outcome.images) if outcome is not None and status == 200 else 0
            await asyncio.shield(
                self._settle_tab(
                    record.id,
                    tab,
                    status=status,
                    backend=backend,
                    attempts=attempts,
                    images=images,
                    cost=spent,
                    billed=self.gw.billed_figure(outcome),
                    megapixels=outcome.megapixels if outcome is not None and status == 200 else None,
                )
            )
            total = time.time() - record.created
            self.gw.metrics.observe_request(route=f"{record.route}_async", status=status, backend=backend, latency_s=total, overhead_s=max(0.0, total - upstream))
        # Terminal only once settled: whoever sees the job end finds its ledger row and its budget settled.
        await finish()

    def _carry_reservation(self, record: JobRecord, tab: Tab) -> None:
        """Adopt the reservation a dead run left in the record, and note every
        change to this run's, so whoever ends the job settles what was held."""
        held = record.reservation
        if held and held.get("units"):
            tab.adopt(windows_from_json(held["windows"]), int(held["units"]))

        async def note(windows: list[Window], units: int) -> None:
            def keep(r: JobRecord) -> bool:
                r.reservation = {"units": units, "windows": windows_to_json(windows)}
                return True

            try:
                await self.jobs.store.update(record.id, keep)
            except Exception as exc:  # noqa: BLE001 - the run goes on; a takeover then reserves afresh
                log.warning("job %s: budget reservation not noted in the record (%s)", record.id, type(exc).__name__)

        tab.on_reserved = note

    async def _settle_tab(self, job_id: str, tab: Tab, **outcome: Any) -> None:
        """Settle the owner's budget and ledger, then drop the reservation from the record (it is settled)."""
        await self.gw.billing.settle(tab, **outcome)
        if not tab.windows:
            return

        def drop(r: JobRecord) -> bool:
            r.reservation = None
            return True

        try:
            await self.jobs.store.update(job_id, drop)
        except Exception as exc:  # noqa: BLE001 - logged: a takeover would release it a second time
            log.warning("job %s: settled reservation not cleared from the record (%s)", job_id, type(exc).__name__)

    @property
    def _keep_images_s(self) -> int:
        """A job's stored images live as long as its record (docs: README, Async jobs)."""
        settings = self.jobs.settings
        return settings.images_kept_s(settings.job_retention_s)

    @staticmethod
    async def _settle(pending: list[asyncio.Task[Any]]) -> None:
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _resume(self, record: JobRecord, job: ImageJob, started: float, tab: Tab) -> tuple[Outcome | None, Decimal, int]:
        """Follow the provider job an earlier run left in flight; (outcome or None, spent, attempts).

        Dispatch tries backends one after another, so only the last backend
        noted can still be running: earlier ones ended (or were cancelled)
        before it began. None means nothing is left to follow, so the job is
        dispatched afresh; the stale ids are dropped first, so a later
        takeover does not follow them again.

        The followed job's quote is reserved in the owner's budget first, as a
        fresh run reserves its worst case; the run settles it to the cost."""
        if not record.provider_jobs:
            return None, Decimal(0), 0
        name, ids = list(record.provider_jobs.items())[-1]
        backend = self.gw.fleet.backends.get(name)
        if backend is None or not backend.adapter.resumable or not ids:
            await self._forget_provider_jobs(record.id)
            return None, Decimal(0), 0
        quote = to_units(backend.bill(job, job.n))
        if quote > tab.reserved_units:  # what the dead run held may already cover it
            await tab.reserve_amount(from_units(quote - tab.reserved_units))  # before the provider is asked anything
        deadline = started + job.deadline_s
        t0 = time.monotonic()
        try:
            result = await backend.adapter.resume(job, ids, deadline)
            images = await self.gw.dispatcher.shaper.shape(job, result.images, backend=name, deadline=deadline, base_url=record.base_url, keep_s=self._keep_images_s)
        except ProviderError as err:
            elapsed = time.monotonic() - t0
            cost = backend.bill(job, job.n) if err.billed else Decimal(0)
            self.gw.metrics.observe_attempt(backend=name, outcome=err.failure.value, latency_s=elapsed)
            if cost:
                self.gw.metrics.record_spend(backend=name, caller=job.caller, usd=cost, megapixels=Decimal(0), images=0, baseline_usd=Decimal(0))
            log.info("%s resume %s: %s", name, err.failure.value, redact(err.message))  # the provider's words, for the operator only
            attempt = Attempt(name, err.failure.value, elapsed, cost, err.status, caller_message_of(name, err))
            if err.failure is FailureClass.CONTENT_FILTERED:
                raise DispatchFailed(
                    "the image was flagged by the safety checker",
                    status=400,
                    code="content_policy_violation",
                    attempts=[attempt],
                    cost_usd=cost,
                    upstream_s=elapsed,
                    retryable=False,
                    type_="invalid_request_error",
                ) from None
            if time.monotonic() >= deadline:
                raise DispatchFailed(
                    f"no backend answered within the {job.deadline_s:g}s deadline", status=504, code="deadline_exceeded", attempts=[attempt], cost_usd=cost, upstream_s=elapsed, retryable=True
                ) from None
            await self._forget_provider_jobs(record.id)
            return None, cost, 1
        elapsed = time.monotonic() - t0
        quoted = bill_produced(backend, job, images)
        billed = trusted_billed(result.reported_cost_usd, quoted)
        if billed is None and result.reported_cost_usd is not None:
            log.warning("job %s: %s reported a cost of %s USD for the taken-over job; counted at the quote instead", record.id, name, result.reported_cost_usd)
        cost = billed if billed is not None else quoted
        megapixels = produced_megapixels(job, images)
        self.gw.metrics.observe_attempt(backend=name, outcome="success", latency_s=elapsed)
        self.gw.metrics.record_spend(backend=name, caller=job.caller, usd=cost, megapixels=megapixels, images=len(images), baseline_usd=backend.baseline_quote(job))
        log.info("job %s: followed its %s job to the end after taking it over", record.id, name)
        outcome = Outcome(name, images, [Attempt(name, "success", elapsed, cost, billed_usd=billed)], cost, elapsed, result.seed, size=produced_size(job, images), megapixels=megapixels)
        return outcome, Decimal(0), 0

    async def _forget_provider_jobs(self, job_id: str) -> None:
        def forget(r: JobRecord) -> bool:
            r.provider_jobs = {}
            return True

        await self.jobs.store.update(job_id, forget)

    async def _finish(
        self, job_id: str, status: str, *, backend: str | None = None, cost: Decimal | None = None, attempts: int = 0, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> None:
        """Record the outcome (a cancel that came first keeps its status, but
        the money spent is still recorded) and schedule the webhook."""
        if self._abandoned:
            return
        changed: list[bool] = []

        def end(r: JobRecord) -> bool:
            r.cost_usd = cost if cost is not None else r.cost_usd
            r.attempts += attempts
            if r.terminal:
                changed.append(False)
                return True
            r.status, r.completed = status, time.time()  # type: ignore[assignment]
            r.backend, r.result, r.error = backend, result, error
            changed.append(True)
            return True

        record = await self.jobs.store.update(job_id, end)
        if record is not None and changed and changed[0]:
            self.gw.metrics.record_job_status(status)
            await self.jobs.schedule_webhook(record)

    # ---- webhooks ------------------------------------------------------------

    async def _webhooks(self) -> None:
        s = self.jobs.settings
        while not self._stopping:
            await asyncio.sleep(0.2)
            with contextlib.suppress(Exception):
                for job_id in await self.jobs.deliveries.take(lease_s=s.webhook_timeout_s + 5, count=16):
                    task = asyncio.get_running_loop().create_task(self._deliver(job_id))
                    self._deliveries.add(task)
                    task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished delivery task, logging what ended it badly (the
        delivery stays scheduled and its lease lapses, so it is tried again)."""
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("webhook delivery task failed: %s", type(task.exception()).__name__)

    async def _deliver(self, job_id: str) -> None:
        jobs, s = self.jobs, self.jobs.settings
        record = await jobs.store.get(job_id)
        if record is None or record.webhook is None or record.webhook.delivered or not record.terminal:
            await jobs.deliveries.done(job_id)
            return
        assert self.webhook_client is not None
        attempt = record.webhook.attempts + 1
        record.webhook.attempts = attempt
        payload = {**record.public(), "event": EVENTS[record.status]}
        body = json.dumps(payload, separators=(",", ":")).encode()
        status, refusal = await self._post_webhook(record.webhook.url, body, record.id)
        delivered = status is not None and 200 <= status < 300

        def note(r: JobRecord) -> bool:
            if r.webhook is None:
                return False
            r.webhook.attempts, r.webhook.last_status = attempt, status
            r.webhook.delivered = r.webhook.delivered or delivered
            r.webhook.refusal = refusal
            return True

        await jobs.store.update(job_id, note)
        delay = None if delivered or refusal is not None else next_delay(s.webhook_retry_delays_s, attempt)
        if delivered:
            self.gw.metrics.record_webhook_delivery("delivered")
            await jobs.deliveries.done(job_id)
        elif delay is None:
            self.gw.metrics.record_webhook_delivery("given_up")
            log.warning("job %s: webhook given up after %d attempts%s", job_id, attempt, f" ({refusal})" if refusal else "")
            await jobs.deliveries.done(job_id)
        else:
            self.gw.metrics.record_webhook_delivery("retrying")
            await jobs.deliveries.at(job_id, time.time() + delay)

    async def _post_webhook(self, url: str, body: bytes, job_id: str) -> tuple[int | None, str | None]:
        """One delivery try: the receiver's status (None: no answer), and why
        the delivery cannot be made at all (None: it can be retried). The URL
        is judged again (it may predate the policy) and the pinned client
        judges the address it connects to; anything that stops a try from
        being made gives the delivery up rather than failing the task."""
        jobs = self.jobs
        assert self.webhook_client is not None
        if jobs.signing_key is None:
            return None, "webhooks are no longer configured (KLEIN_WEBHOOK_SECRET is unset)"
        try:
            check_url(url, jobs.allowlist)
            headers = signed_headers(jobs.signing_key, f"msg_{job_id}", body)
            response = await self.webhook_client.post(url, content=body, headers=headers, timeout=jobs.settings.webhook_timeout_s)
        except GatewayError as exc:
            return None, exc.message
        except httpx.HTTPError as exc:
            cause = exc.__cause__
            if isinstance(cause, AddressRefused):
                unresolved = cause.__cause__
                if isinstance(unresolved, HostUnresolved) and not unresolved.permanent:
                    return None, None  # the resolver did not answer in time: try again later
                return None, str(cause)
            return None, None
        except Exception as exc:  # noqa: BLE001 - a URL httpx cannot send to (InvalidURL and kin) is given up, never retried forever
            return None, f"the delivery could not be attempted: {type(exc).__name__}"
        return response.status_code, None
