"""Prometheus metrics for cost, latency and health (docs/design.md#metrics).

Every name starts with `klein_`. Labels stay low-cardinality: backend, route,
status class, outcome, failure reason, and a bounded caller label (a
configured name or a keyed hash, `gateway.domain.callers.caller_label`); never
prompts, request ids, raw keys or plain hashes of keys.

Several worker processes: prometheus_client keeps one value per process, so a
scrape that lands on one worker sees only that worker's counters and they
jump between scrapes (LiteLLM's bug, https://github.com/BerriAI/litellm/issues/10595). When
`PROMETHEUS_MULTIPROC_DIR` is set before the process starts, every worker
writes its values to files in that directory and `render()` sums them. It
must be set before `prometheus_client` is first imported (the library picks
its value store at import time), and emptied before the server starts.

Multiprocess gauge modes, chosen here:
- in-flight requests: `livesum` (the total across live workers);
- breaker state: `livemax` (the worst state any live worker holds: with
  in-memory state each worker has its own breaker, and "open somewhere" is
  what an operator needs to see); backend up: `livemin` to match;
- prices: `mostrecent` (every worker sets the same figure; the newest wins
  after a price-sheet reload).
"live" modes drop a dead worker's figures once `mark_process_dead(pid)` is
called (a gunicorn `child_exit` hook); without it they behave as max/min/sum.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from gateway.providers.base import FailureClass
from gateway.redaction import looks_like_secret
from gateway.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Whole-request latency: an image takes about 0.5-3 s end to end on hosted
# backends, queued work up to a minute (docs/design.md#performance-targets), so buckets run
# from tens of milliseconds to two minutes.
REQUEST_BUCKETS: Final = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    120.0,
)
# Gateway overhead (total time minus time waiting on backends): the target is
# p50 <= 2 ms and p99 <= 10 ms (docs/design.md#performance-targets), so buckets start below
# a millisecond and have edges at both targets.
OVERHEAD_BUCKETS: Final = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

ANONYMOUS: Final = "anonymous"  # no caller key (the gateway runs open)
OTHER: Final = "other"  # callers past the first `max_callers`
REDACTED: Final = "redacted"  # a caller label that looked like a secret

BREAKER_STATES: Final = {"closed": 0, "half_open": 1, "open": 2}
FAILURE_CLASSES: Final = tuple(c.value for c in FailureClass)
ATTEMPT_OUTCOMES: Final = ("success", *FAILURE_CLASSES)
ONE_MP_AT_1024: Final = Decimal(1024 * 1024) / Decimal(1_000_000)


def multiprocess_dir() -> str | None:
    """The shared metrics directory, or None in single-process mode."""
    env = Settings.from_env()
    return env.prometheus_multiproc_dir or env.prometheus_multiproc_dir_lowercase or None


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight, breaker state).

    Call from the process manager when a worker exits (gunicorn: the
    `child_exit` server hook). A no-op in single-process mode."""
    path = multiprocess_dir()
    if path:
        multiprocess.mark_process_dead(pid, path)


def status_class(status: int) -> str:
    """200 -> "2xx"; the label that keeps status codes low-cardinality."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


STREAM_ROUTES = ("generations", "edits")  # the routes that stream (stream: true)


class GatewayMetrics:
    """Every `klein_*` metric, behind the calls the request path makes.

    `registry`: where the metrics live; a fresh private registry when None
    (so several apps in one test process do not collide), which also carries
    the process and platform collectors in single-process mode.
    `baseline_backend`: savings are measured against this backend's price;
    the caller of `record_spend` supplies the baseline figure per request.
    `max_callers`: the first N distinct caller key ids get their own label
    value on spend; later ones share "other". In multiprocess mode each
    worker admits its own first N, so the bound is N per worker.
    """

    def __init__(
        self,
        *,
        baseline_backend: str | None = "fal",
        registry: CollectorRegistry | None = None,
        max_callers: int = 50,
    ) -> None:
        self.baseline_backend = baseline_backend
        self.max_callers = max_callers
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir and values.ValueClass is values.MutexValue:
            log.warning(
                "%s is set but prometheus_client was imported before it was; this process's own metrics stay in memory and are not in the shared figures",
                MULTIPROC_ENV,
            )
        owned = registry is None
        self.registry = registry if registry is not None else CollectorRegistry()
        if owned and not self.multiprocess_dir:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._callers: set[str] = set()
        self._callers_lock = threading.Lock()
        self._known_backends: set[str] = set()
        # The request path's labelled children, looked up once: `labels()` validates,
        # takes a lock and builds a tuple on every call (about ten a request).
        self._children: dict[tuple[Any, ...], Any] = {}
        r = self.registry

        # --- traffic and latency -------------------------------------------
        self.requests = Counter("klein_requests", "Requests answered, by route, status class and serving backend ('none' if no backend served).", ["route", "status_class", "backend"], registry=r)
        self.request_duration = Histogram("klein_request_duration_seconds", "Whole-request latency as the caller sees it.", ["route"], buckets=REQUEST_BUCKETS, registry=r)
        self.overhead = Histogram("klein_gateway_overhead_seconds", "Request time not spent waiting on backends.", ["route"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.in_flight_requests = Gauge("klein_in_flight_requests", "Requests being handled now.", registry=r, multiprocess_mode="livesum")
        self.shutdown_cancelled = Counter("klein_shutdown_cancelled_requests", "Requests still running when the shutdown grace ended, cancelled with their provider jobs.", registry=r)

        # --- upstream attempts ---------------------------------------------
        self.upstream_duration = Histogram("klein_upstream_duration_seconds", "Latency of one attempt on one backend, by outcome.", ["backend", "outcome"], buckets=REQUEST_BUCKETS, registry=r)
        self.upstream_attempts = Counter("klein_upstream_attempts", "Attempts on backends, by outcome ('success' or a failure class).", ["backend", "outcome"], registry=r)
        self.failovers = Counter("klein_failovers", "Times dispatch moved on from a backend, by the failure that caused it.", ["from_backend", "reason"], registry=r)
        self.double_spend = Counter("klein_possible_double_spend", "Work that may have been billed twice (an unknown outcome followed by another attempt).", ["backend"], registry=r)

        # --- streams (stream: true) -----------------------------------------
        self.stream_first_event = Histogram(
            "klein_stream_first_event_seconds", "Time from a streamed request's arrival to its first image event (a preview or the completed image).", ["route"], buckets=REQUEST_BUCKETS, registry=r
        )
        self.stream_previews = Counter("klein_stream_previews", "Partial images (previews) sent on streams.", ["route"], registry=r)
        self.streams_ended_early = Counter("klein_streams_ended_early", "Streams whose caller left before the last event (the work is still settled).", ["route"], registry=r)
        self._know_stream_routes()

        # --- spend ----------------------------------------------------------
        self.cost = Counter("klein_cost_usd", "USD billed, every billed attempt included; sums to the x-klein-cost-usd headers.", ["backend", "caller"], registry=r)
        self.possibly_billed = Counter(
            "klein_possibly_billed_usd",
            "USD of work whose outcome is unknown and whose cancel was not confirmed (it may be billed); sums to the x-klein-possibly-billed-usd headers. Not in klein_cost_usd.",
            ["backend"],
            registry=r,
        )
        self.megapixels = Counter("klein_megapixels", "Output megapixels billed.", ["backend"], registry=r)
        self.images = Counter("klein_images", "Images billed.", ["backend"], registry=r)
        self.baseline_cost = Counter("klein_baseline_cost_usd", "What the same requests would have cost on the baseline backend.", ["backend"], registry=r)
        self.savings = Counter("klein_savings_usd", "Baseline cost minus actual cost, where positive.", ["backend"], registry=r)
        self.excess_cost = Counter("klein_excess_cost_usd", "Actual cost minus baseline cost, where positive (net savings = savings - excess).", ["backend"], registry=r)
        # Reconciliation (gateway/money/reconcile.py): what providers say they billed, and
        # the gateway's estimate for the same requests, so the two compare like with like.
        self.billed = Counter("klein_billed_usd", "USD the provider reported billing, where its answer carries the figure.", ["backend", "source"], registry=r)
        self.billed_estimate = Counter("klein_billed_estimate_usd", "The gateway's estimate for the requests counted in klein_billed_usd_total.", ["backend", "source"], registry=r)

        # --- health and prices ---------------------------------------------
        self.breaker_state = Gauge("klein_backend_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", ["backend"], registry=r, multiprocess_mode="livemax")
        self.backend_up = Gauge("klein_backend_up", "1 if the breaker lets traffic through (closed or half-open), else 0.", ["backend"], registry=r, multiprocess_mode="livemin")
        self.ledger_backlog = Gauge(
            "klein_ledger_backlog_rows",
            "Usage rows settled but not yet written to the ledger store: in the Redis ledger stream (shared by replicas), or waiting in this process after a failed write.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ledger_lost = Counter("klein_ledger_rows_lost", "Usage rows dropped because the ledger store stayed away and this process's bounded queue was full (no Redis stream).", registry=r)
        self.state_round_trips = Counter("klein_state_round_trips", "Round trips to the shared state store (Redis), by operation; a batch or pipeline is one.", ["op"], registry=r)
        self.backend_quote = Gauge("klein_backend_quote_usd", "Price of one 1024x1024 text-to-image on each backend.", ["backend"], registry=r, multiprocess_mode="mostrecent")
        self.baseline_quote = Gauge("klein_baseline_quote_usd", "Price of one 1024x1024 text-to-image on the baseline backend.", registry=r, multiprocess_mode="mostrecent")
        self._init_job_metrics(r)

    # ---- request path ------------------------------------------------------

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        self.in_flight_requests.inc()
        try:
            yield
        finally:
            self.in_flight_requests.dec()

    def in_flight(self) -> AbstractContextManager[None]:
        """Count a request as in flight while the block runs (klein_in_flight_requests)."""
        return self._in_flight()

    def observe_request(self, *, route: str, status: int, backend: str | None, latency_s: float, overhead_s: float) -> None:
        """One answered request. `route` is the route template (never a raw
        path); `backend` is the one that served it, None when none did;
        `overhead_s` is total time minus time waiting on backends."""
        child = self._child
        child(self.requests, route, status_class(status), backend or "none").inc()
        child(self.request_duration, route).observe(max(0.0, latency_s))
        child(self.overhead, route).observe(max(0.0, overhead_s))

    def observe_attempt(self, *, backend: str, outcome: str, latency_s: float) -> None:
        """One attempt on one backend; `outcome` is "success" or a FailureClass value."""
        self._know_backend(backend)
        outcome = str(outcome)
        self._child(self.upstream_attempts, backend, outcome).inc()
        self._child(self.upstream_duration, backend, outcome).observe(max(0.0, latency_s))

    def record_spend(
        self,
        *,
        backend: str,
        caller: str | None,
        usd: Decimal,
        megapixels: Decimal,
        images: int,
        baseline_usd: Decimal | None,
    ) -> None:
        """Money spent on one billed attempt.

        Call it for every billed attempt, failed billed attempts included, so
        that klein_cost_usd_total sums to the x-klein-cost-usd headers.

        Savings: when `baseline_usd` is given, `baseline_usd - usd` is added
        to klein_savings_usd_total (if positive) or to
        klein_excess_cost_usd_total (if negative), and `baseline_usd` to
        klein_baseline_cost_usd_total; net savings are savings minus excess.
        Give the request's baseline figure once per request (with the attempt
        that delivered, or the last billed one); give `Decimal(0)` on other
        billed attempts so money lost on them counts against savings; give
        None where no baseline comparison exists (no baseline configured, or
        the baseline backend could not have served the job).
        """
        if usd < 0 or megapixels < 0 or images < 0:
            raise ValueError("spend figures cannot be negative")
        self._know_backend(backend)
        child = self._child
        child(self.cost, backend, self._caller_label(caller)).inc(float(usd))
        child(self.megapixels, backend).inc(float(megapixels))
        child(self.images, backend).inc(images)
        if baseline_usd is None:
            return
        if baseline_usd < 0:
            raise ValueError("baseline_usd cannot be negative")
        child(self.baseline_cost, backend).inc(float(baseline_usd))
        delta = baseline_usd - usd
        if delta >= 0:
            child(self.savings, backend).inc(float(delta))
        else:
            child(self.excess_cost, backend).inc(float(-delta))

    def record_billed(self, *, backend: str, source: str, billed_usd: Decimal, estimated_usd: Decimal) -> None:
        """A provider's own billed figure for one request, beside the gateway's estimate of it."""
        if billed_usd < 0 or estimated_usd < 0:
            raise ValueError("billed figures cannot be negative")
        self.billed.labels(backend, source).inc(float(billed_usd))
        self.billed_estimate.labels(backend, source).inc(float(estimated_usd))

    def know_billed_source(self, backend: str, source: str) -> None:
        """Create the billed series at zero, so increase() sees the first figure."""
        self.billed.labels(backend, source)
        self.billed_estimate.labels(backend, source)

    def record_possibly_billed(self, *, backend: str, usd: Decimal) -> None:
        """Work on `backend` of unknown outcome that may be billed (its cancel
        was not confirmed, or the provider has none)."""
        if usd < 0:
            raise ValueError("possibly billed figures cannot be negative")
        self._know_backend(backend)
        self.possibly_billed.labels(backend).inc(float(usd))

    def record_failover(self, *, from_backend: str, reason: str) -> None:
        """Dispatch left `from_backend` for another; `reason` is a FailureClass value."""
        self.failovers.labels(from_backend, str(reason)).inc()

    def _know_stream_routes(self) -> None:
        """The stream series at zero from the start, so `rate()` sees their first increment
        (a series born at 1 hides it)."""
        for route in STREAM_ROUTES:
            self.stream_first_event.labels(route)
            self.stream_previews.labels(route)
            self.streams_ended_early.labels(route)

    def observe_stream_event(self, *, route: str, since_start_s: float, first: bool, preview: bool) -> None:
        """An image event sent on a stream: its time to first event, and whether it was a preview."""
        if first:
            self._child(self.stream_first_event, route).observe(max(0.0, since_start_s))
        if preview:
            self._child(self.stream_previews, route).inc()

    def record_stream_ended_early(self, *, route: str) -> None:
        self._child(self.streams_ended_early, route).inc()

    def record_double_spend(self, *, backend: str) -> None:
        """Work on `backend` may have been billed twice (unknown outcome, then more work)."""
        self.double_spend.labels(backend).inc()

    def record_shutdown_cancelled(self, count: int) -> None:
        """`count` requests outlived the shutdown grace and were cancelled."""
        if count:
            self.shutdown_cancelled.inc(count)

    def set_ledger_backlog(self, rows: int) -> None:
        """Usage rows settled and not yet in the ledger store."""
        self.ledger_backlog.set(rows)

    def record_ledger_lost(self, rows: int = 1) -> None:
        self.ledger_lost.inc(rows)

    def count_state_round_trip(self, op: str) -> None:
        self.state_round_trips.labels(op).inc()

    def set_breaker_state(self, backend: str, state: str) -> None:
        """The breaker of `backend` is now "closed", "half_open" or "open"."""
        value = BREAKER_STATES.get(str(state))
        if value is None:
            raise ValueError(f"unknown breaker state {state!r}; expected one of {sorted(BREAKER_STATES)}")
        self._know_backend(backend)
        self.breaker_state.labels(backend).set(value)
        self.backend_up.labels(backend).set(0 if value == 2 else 1)

    def set_backend_price(self, backend: str, usd_per_mp_at_1mp: Decimal) -> None:
        """Publish the price of one 1024x1024 image on `backend`, for price ladders.

        `usd_per_mp_at_1mp` is the backend's per-MP price for a 1 MP image;
        the gauge holds it times 1.048576 MP. Setting it for the baseline
        backend also sets klein_baseline_quote_usd, which the savings-lost
        alert compares against. Call at start-up and on every price reload."""
        self.set_backend_quote(backend, usd_per_mp_at_1mp * ONE_MP_AT_1024)

    def set_backend_quote(self, backend: str, usd_for_1024_square: Decimal) -> None:
        """Publish the price of one 1024x1024 text-to-image on `backend` as
        quoted (e.g. `backend.quote(job).usd` for that job), whatever the
        backend's price basis; for the baseline backend also
        klein_baseline_quote_usd. Call at start-up and on every price reload."""
        quote = float(usd_for_1024_square)
        self._know_backend(backend)
        self.backend_quote.labels(backend).set(quote)
        if backend == self.baseline_backend:
            self.baseline_quote.set(quote)

    # ---- async jobs, webhooks, idempotency ---------------------------------

    def _init_job_metrics(self, r: CollectorRegistry) -> None:
        self.jobs = Counter("klein_image_jobs", "Async image jobs reaching each status (queued when accepted).", ["status"], registry=r)
        self.job_queue_depth = Gauge("klein_image_job_queue_depth", "Async jobs waiting for a worker (shared by replicas when jobs live in Redis).", registry=r, multiprocess_mode="livemax")
        self.job_oldest_age = Gauge("klein_image_job_oldest_queued_age_seconds", "Age of the oldest async job still waiting for a worker.", registry=r, multiprocess_mode="livemax")
        self.job_event_streams = Gauge("klein_image_job_event_streams", "Async job event streams (GET /v1/images/jobs/{id}/events) open now.", registry=r, multiprocess_mode="livesum")
        self.job_event_streams_abandoned = Counter("klein_image_job_event_streams_abandoned", "Async job event streams the caller closed before the job's terminal event.", registry=r)
        self.batches = Counter("klein_batches", "Batches reaching each end: completed, failed, expired, cancelled.", ["status"], registry=r)
        self.batch_lines = Counter(
            "klein_batch_lines", "Batch lines by how they ended: local (the local GPU served it), hosted (spilled to a hosted backend), failed, cancelled.", ["state"], registry=r
        )
        for state in ("local", "hosted", "failed", "cancelled"):  # at zero from the start: the spill share has a value before any batch
            self.batch_lines.labels(state)
        self.batch_spend = Counter("klein_batch_spend_usd", "What batch lines cost, USD (also counted in klein_cost_usd_total with every request).", registry=r)
        self.webhook_deliveries = Counter("klein_webhook_deliveries", "Webhook delivery attempts by outcome: delivered, retrying (failed, will retry), given_up.", ["outcome"], registry=r)
        self.idempotency = Counter(
            "klein_idempotency_requests",
            "Requests with an Idempotency-Key by outcome: original, replayed, in_use (409), reused (422), unavailable (503, the shared store is away).",
            ["outcome"],
            registry=r,
        )
        for status in ("queued", "running", "succeeded", "failed", "canceled"):
            self.jobs.labels(status)
        for outcome in ("delivered", "retrying", "given_up"):
            self.webhook_deliveries.labels(outcome)
        for outcome in ("original", "replayed", "in_use", "reused", "unavailable"):
            self.idempotency.labels(outcome)

    def _job_collectors(self) -> tuple[Counter | Gauge, ...]:
        return (
            self.jobs,
            self.job_queue_depth,
            self.job_oldest_age,
            self.job_event_streams,
            self.job_event_streams_abandoned,
            self.webhook_deliveries,
            self.idempotency,
            self.batches,
            self.batch_lines,
            self.batch_spend,
        )

    def record_batch_status(self, status: str) -> None:
        """A batch ended with `status`."""
        self.batches.labels(status).inc()

    def record_batch_line(self, state: str, cost_usd: Decimal) -> None:
        """A batch line's job ended: `state` local, hosted, failed or cancelled; what it cost."""
        self.batch_lines.labels(state).inc()
        if cost_usd:
            self.batch_spend.inc(float(cost_usd))

    def record_job_status(self, status: str) -> None:
        """An async job was accepted ("queued"), started, or ended with `status`."""
        self.jobs.labels(status).inc()

    def set_job_queue(self, *, depth: int, oldest_age_s: float) -> None:
        self.job_queue_depth.set(depth)
        self.job_oldest_age.set(max(0.0, oldest_age_s))

    def open_job_event_stream(self) -> None:
        self.job_event_streams.inc()

    def close_job_event_stream(self, *, abandoned: bool) -> None:
        """An event stream ended: after the terminal event or at its cap, or (`abandoned`) because its caller left first."""
        self.job_event_streams.dec()
        if abandoned:
            self.job_event_streams_abandoned.inc()

    def record_webhook_delivery(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    def record_idempotency(self, outcome: str) -> None:
        self.idempotency.labels(outcome).inc()

    # ---- exposition --------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type. In multiprocess mode the
        figures of every worker, summed; otherwise this registry's."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def metric_names(self) -> frozenset[str]:
        """Every `klein_*` sample name this class can expose (with the
        `_total`, `_bucket`, `_sum`, `_count` suffixes), for checking
        dashboards and rules against."""
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
        }
        names: set[str] = set()
        for collector in (
            self.requests,
            self.request_duration,
            self.overhead,
            self.in_flight_requests,
            self.upstream_duration,
            self.upstream_attempts,
            self.failovers,
            self.double_spend,
            self.cost,
            self.possibly_billed,
            self.megapixels,
            self.images,
            self.baseline_cost,
            self.savings,
            self.excess_cost,
            self.breaker_state,
            self.backend_up,
            self.ledger_backlog,
            self.ledger_lost,
            self.backend_quote,
            self.baseline_quote,
            self.shutdown_cancelled,
            self.billed,
            self.billed_estimate,
            self.state_round_trips,
            self.stream_first_event,
            self.stream_previews,
            self.streams_ended_early,
            *self._job_collectors(),
        ):
            for family in collector.describe():
                names.update(family.name + s for s in suffixes[family.type])
        return frozenset(names)

    # ---- internals ---------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (label values are bounded, see the module docstring)."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def _caller_label(self, caller: str | None) -> str:
        """Bound the caller label (made by `gateway.domain.callers.caller_label`): the
        first `max_callers` labels, then "other". A value that looks like a
        key is never used as a label."""
        if not caller:
            return ANONYMOUS
        if looks_like_secret(caller):
            return REDACTED
        caller = caller[:64]
        with self._callers_lock:
            if caller in self._callers:
                return caller
            if len(self._callers) < self.max_callers:
                self._callers.add(caller)
                return caller
        return OTHER

    def _know_backend(self, backend: str) -> None:
        """Create a backend's counters at zero the first time it is named, so
        `rate()` and `increase()` see their first increment. Attempts and
        failovers get a series per outcome and failure class up front too: a
        series born at 1 hides its first failure from `rate()`, and the first
        failures after a restart are the ones an operator looks for."""
        if backend in self._known_backends:
            return
        self._known_backends.add(backend)
        for counter in (self.megapixels, self.images, self.double_spend, self.possibly_billed, self.baseline_cost, self.savings, self.excess_cost):
            counter.labels(backend)
        for outcome in ATTEMPT_OUTCOMES:
            self.upstream_attempts.labels(backend, outcome)
        self.upstream_duration.labels(backend, "success")  # the latency panel's series
        for reason in FAILURE_CLASSES:
            self.failovers.labels(backend, reason)
