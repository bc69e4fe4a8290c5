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
from gateway.dispatch.attempts import DispatchFailed, Outcome, tried
from gateway.dispatch.followup import follow, outcome_of, settled_attempts, spent
from gateway.dispatch.progress import Progress, Unsettled
from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob
from gateway.jobs.model import JobRecord
from gateway.jobs.queue import Message
from gateway.jobs.webhooks import check_url, delivery_client, next_delay, signed_headers
from gateway.money.budgets import Window, from_units, to_units, windows_from_json, windows_to_json
from gateway.money.keys import Caller
from gateway.money.tab import OwnerKeyRevoked, Tab
from gateway.net.pinning import AddressRefused, HostUnresolved, Resolver, SystemResolver
from gateway.providers.base import FailureClass, job_id_listener

if TYPE_CHECKING:
    from gateway.jobs.pipeline import Pipeline
    from gateway.jobs.service import Jobs

log = logging.getLogger("klein.gateway.jobs")

CANCEL_POLL_S = 0.5  # how soon a cancel made on another replica reaches the job's worker
MAX_RUNS = 5  # a job whose worker died this many times is failed, not retried forever
EVENTS = {"succeeded": "image.job.succeeded", "failed": "image.job.failed", "canceled": "image.job.canceled"}


def consumer_name() -> str:
    """This process's name in the consumer group: unique per process start."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def _nothing() -> None:
    return None


async def _quietly(call: Awaitable[Any]) -> None:
    """A provider cancel whose answer changes nothing here: the attempt learns the job's end by polling."""
    with contextlib.suppress(Exception):
        await call


@dataclass
class _Running:
    record_id: str
    message: Message
    task: asyncio.Task[Any]
    progress: Progress = field(default_factory=Progress)
    stopping: bool = False  # its owner's cancel has been acted on


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
        loops = [self._slot(i) for i in range(s.job_concurrency)] + [self._heartbeat(), self._cancel_watch(), self._gauges(), self._webhooks()]
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
            await self._finish(record.id, "failed", error=GatewayError(f"the job was interrupted {record.runs} times", status=500, code="job_interrupted").envelope()["error"], status_code=500)
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
        progress = Progress(stop_requested=record.cancel_requested is not None)
        task = asyncio.get_running_loop().create_task(self._run(record, progress))
        self._running[message.id] = _Running(record.id, message, task, progress)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():  # canceled by its owner before any provider was called: settled at 0
                await self._finish(record.id, "canceled", cost=Decimal(0), status_code=499)
                await self.jobs.queue.ack(message)
                return
            raise  # the process is stopping: the job stays claimed for another replica
        finally:
            if task.done():
                self._running.pop(message.id, None)
        await self.jobs.queue.ack(message)

    async def _heartbeat(self) -> None:
        """Keep this replica's claims fresh."""
        s = self.jobs.settings
        while not self._stopping:
            await asyncio.sleep(max(0.2, s.job_visibility_timeout_s / 3))
            running = list(self._running.values())
            if running:
                with contextlib.suppress(Exception):
                    await self.jobs.queue.touch(self.consumer, [r.message.id for r in running])

    async def _cancel_watch(self) -> None:
        """Act on cancels made on other replicas within CANCEL_POLL_S (this replica's own arrive at once, `cancel_requested`)."""
        while not self._stopping:
            await asyncio.sleep(CANCEL_POLL_S)
            for r in list(self._running.values()):
                if r.stopping or r.task.done():
                    continue
                with contextlib.suppress(Exception):
                    current = await self.jobs.store.get(r.record_id)
                    if current is not None and current.cancel_requested is not None:
                        self._stop(r, current)

    def cancel_requested(self, record: JobRecord) -> None:
        """Its owner asked to cancel `record`, running on this replica (or not here at all)."""
        for r in list(self._running.values()):
            if r.record_id == record.id:
                self._stop(r, record)

    def _stop(self, r: _Running, record: JobRecord) -> None:
        """Stop a canceled job without losing money: before any provider was
        called the run is simply cancelled (nothing spent). After, no further
        attempt starts, and its provider jobs are asked to cancel: what they
        cost is what the provider's own end says (a queued job cancelled is
        free; one that ran is billed), settled when the attempt ends."""
        if r.stopping or r.task.done():
            return
        r.stopping = True
        r.progress.stop_requested = True
        if not r.progress.handed_over:
            r.task.cancel()
            return
        for name, ids in record.provider_jobs.items():
            backend = self.gw.fleet.backends.get(name)
            if backend is None:
                continue
            for provider_job_id in ids:
                task = asyncio.get_running_loop().create_task(_quietly(backend.adapter.cancel(provider_job_id)))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _gauges(self) -> None:
        while not self._stopping:
            with contextlib.suppress(Exception):
                depth, age = await self.jobs.queue.depth()
                self.gw.metrics.set_job_queue(depth=depth, oldest_age_s=age)
            await asyncio.sleep(1.0)

    # ---- running one job -----------------------------------------------------

    async def _run(self, record: JobRecord, progress: Progress | None = None) -> None:
        progress = progress or Progress(stop_requested=record.cancel_requested is not None)
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
            if outcome is None and progress.stop_requested:
                raise GatewayError("the job was canceled by its owner", status=499, code="job_canceled", retryable=False)
            if outcome is None:
                try:
                    outcome = await self.gw.images(job, started=started, base_url=record.base_url, tab=tab, keep_images_s=self._keep_images_s, progress=progress)
                except DispatchFailed as err:
                    outcome = await self._follow_up(err, record)  # the deadline left a provider job running: its end decides
            spent, attempts = outcome.cost_usd + extra_cost, outcome.tried + extra_attempts
            backend, upstream, status = outcome.backend, outcome.upstream_s, 200
            body = images_body(job, outcome)
            await self._settle(pending)
            finish = functools.partial(self._finish, record.id, "succeeded", backend=outcome.backend, cost=spent, attempts=attempts, result=body, status_code=200)
        except DispatchFailed as err:
            status, upstream = err.status, err.upstream_s
            spent, attempts = err.cost_usd + extra_cost, tried(err.attempts) + extra_attempts
            await self._settle(pending)
            finish = functools.partial(self._finish, record.id, "failed", cost=spent, attempts=attempts, error=err.envelope()["error"], status_code=err.status)
        except GatewayError as err:
            status = err.status
            spent, attempts = extra_cost, extra_attempts
            await self._settle(pending)
            finish = functools.partial(self._finish, record.id, "failed", cost=spent, attempts=attempts, error=err.envelope()["error"], status_code=err.status)
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

    async def _follow_up(self, err: DispatchFailed, record: JobRecord) -> Outcome:
        """Follow the provider jobs the job's deadline left running: a success
        is the job's outcome (late, but paid for); otherwise `err` is raised
        again with what they cost (gateway/dispatch/followup.py)."""
        if not err.unsettled:
            raise err
        followed = [await follow(self.gw.dispatcher, u, base_url=record.base_url, keep_images_s=self._keep_images_s) for u in err.unsettled]
        outcome = outcome_of(err, followed)
        if outcome is not None:
            return outcome
        cost, possibly = spent(err, followed)
        raise DispatchFailed(
            err.message,
            status=err.status,
            code=err.code or "deadline_exceeded",
            attempts=settled_attempts(err, followed),
            cost_usd=cost,
            upstream_s=err.upstream_s,
            retryable=err.retryable,
            type_=err.type,
            possibly_billed_usd=possibly,
        )

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
        # Followed to the provider's own end, past the job's deadline if need be: the money follows the provider.
        followed = await follow(self.gw.dispatcher, Unsettled(name, job, tuple(ids), from_units(quote)), base_url=record.base_url, keep_images_s=self._keep_images_s)
        attempt = followed.attempt
        if followed.succeeded:
            log.info("job %s: followed its %s job to the end after taking it over", record.id, name)
            outcome = Outcome(name, followed.images, [attempt], followed.cost_usd, attempt.latency_s, followed.seed, size=followed.size, megapixels=followed.megapixels)
            return outcome, Decimal(0), 0
        filtered = attempt.outcome == FailureClass.CONTENT_FILTERED.value
        if filtered or time.monotonic() >= started + job.deadline_s:  # flagged, or no time left to run it afresh
            raise DispatchFailed(
                "the image was flagged by the safety checker" if filtered else f"no backend answered within the {job.deadline_s:g}s deadline",
                status=400 if filtered else 504,
                code="content_policy_violation" if filtered else "deadline_exceeded",
                attempts=[attempt],
                cost_usd=followed.cost_usd,
                upstream_s=attempt.latency_s,
                retryable=not filtered,
                type_="invalid_request_error" if filtered else "server_error",
                possibly_billed_usd=followed.possibly_billed_usd,
            )
        await self._forget_provider_jobs(record.id)
        return None, followed.cost_usd, 1

    async def _forget_provider_jobs(self, job_id: str) -> None:
        def forget(r: JobRecord) -> bool:
            r.provider_jobs = {}
            return True

        await self.jobs.store.update(job_id, forget)

    async def _finish(
        self,
        job_id: str,
        status: str,
        *,
        backend: str | None = None,
        cost: Decimal | None = None,
        attempts: int = 0,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        status_code: int | None = None,
    ) -> None:
        """Record the outcome and schedule the webhook. A job whose owner asked
        to cancel it ends `canceled`, with what it really cost (and the image,
        where its provider job made one before it stopped: it was paid for)."""
        if self._abandoned:
            return
        ended: list[str] = []

        def end(r: JobRecord) -> bool:
            r.cost_usd = cost if cost is not None else r.cost_usd
            r.attempts += attempts
            if r.terminal:
                return True
            final = "canceled" if r.cancel_requested is not None else status
            r.status, r.completed = final, time.time()  # type: ignore[assignment]
            r.backend, r.result, r.status_code = backend, result, status_code
            r.error = None if final == "canceled" and result is not None else error
            ended.append(final)
            return True

        record = await self.jobs.store.update(job_id, end)
        if record is not None and ended:
            self.gw.metrics.record_job_status(ended[0])
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
