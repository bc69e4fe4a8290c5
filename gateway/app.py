"""Build the litestar application from providers.yaml and the environment."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from litestar import Litestar
from litestar.exceptions import HTTPException

from gateway.batches.runner import BatchRunner
from gateway.batches.store import BatchStore
from gateway.config import ConfigError, GatewayConfig, load_config, shipped_config
from gateway.dispatch.attempts import Dispatcher
from gateway.dispatch.delivery import ResultShaper
from gateway.dispatch.fleet import BackendFleet
from gateway.dispatch.shutdown import Drain, on_sigterm
from gateway.dispatch.upload_links import UploadLinks
from gateway.domain.errors import GatewayError
from gateway.domain.job import ImageJob, JobKind
from gateway.files import Files
from gateway.health.probes import Prober
from gateway.health.records import merge_pushed_back
from gateway.health.tracker import HealthTracker
from gateway.http import batches, extensions, files, jobs, openai, openapi, usage
from gateway.http.errors import gateway_error_handler, http_exception_handler, internal_error_handler, stamp_request_id
from gateway.images import open_image_store
from gateway.jobs.service import open_jobs
from gateway.jobs.worker import JobWorker
from gateway.money.budgets import MemoryBudgets, RedisBudgets
from gateway.money.idempotency import Idempotency
from gateway.money.keys import KeyRing, KeysFileError
from gateway.money.ledger import Ledger, LedgerStream
from gateway.money.ledger import open_store as open_ledger
from gateway.money.ratelimit import RateLimiter
from gateway.money.reconcile import SOURCES
from gateway.money.tab import Billing
from gateway.net.pinning import PinnedTransport, SystemResolver
from gateway.net.transport import httpx_wire, upstream_client_choice, upstream_wire
from gateway.net.wire import USER_AGENT, Wire
from gateway.observability.logs import RequestLogger, configure_logging
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.metrics_access import MetricsAccess
from gateway.redaction import register_secrets
from gateway.service import Gateway
from gateway.settings import Settings
from gateway.state import open_store

log = logging.getLogger("klein.gateway")

# One pooled client for every provider: connection reuse matters more than
# anything else for the gateway's added latency. Enough connections for
# thousands of requests in flight against slow upstreams.
MAX_UPSTREAM_CONNECTIONS = 8000


# Where signed image URLs point; overrides providers.yaml `gateway.public_base_url`.
PUBLIC_BASE_URL_ENV = "KLEIN_PUBLIC_BASE_URL"

# The price ladder exported for dashboards: one 1024x1024 text-to-image image.
REFERENCE_JOB = ImageJob(kind=JobKind.GENERATE, prompt="reference", width=1024, height=1024)


def parse_keys(value: str | None) -> frozenset[str]:
    return frozenset(k.strip() for k in (value or "").split(",") if k.strip())


def build_gateway(config: GatewayConfig, env: Mapping[str, str], *, transport: httpx.AsyncBaseTransport | None = None, metrics: GatewayMetrics | None = None) -> Gateway:
    """Every part of the gateway, wired; `transport` lets tests mock all upstream HTTP."""
    keys = parse_keys(Settings.from_env(env).gateway_keys)
    metrics_access = MetricsAccess.from_env(env)
    register_secrets([*(b.credential for b in config.backends), *keys, metrics_access.token])  # never in a log line, label or answer
    wire: Wire
    if transport is not None:
        wire = httpx_wire(transport)
    else:
        try:
            wire = upstream_wire(upstream_client_choice(config.settings.upstream_client, env), MAX_UPSTREAM_CONNECTIONS)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    # Caller URLs are fetched with a separate client that never carries provider state,
    # connecting only to the public address it checked (PinnedTransport).
    resolver = SystemResolver()
    fetch_client = httpx.AsyncClient(transport=transport or PinnedTransport(resolver), follow_redirects=False, trust_env=False, headers={"user-agent": USER_AGENT})
    fleet = BackendFleet(config, wire, fetch_client)
    store = open_store(env.get("REDIS_URL") or None, merge=merge_pushed_back)
    policies = {b.name: b.config.breaker for b in config.enabled}
    kinds = {b.name: b.config.kind for b in config.enabled}
    health = HealthTracker(store, policies, kinds, refresh_s=config.settings.health_refresh_ms / 1000)
    metrics = metrics or GatewayMetrics(baseline_backend=config.settings.baseline_backend)
    store.count_round_trips(metrics.count_state_round_trip)
    health.on_state_change(lambda name, state: metrics.set_breaker_state(name, state.value))
    settings = config.settings
    images_store = open_image_store(settings, env)
    fleet.uploads = UploadLinks(images_store, settings)
    dispatcher = Dispatcher(fleet.backends, health, ResultShaper(wire, images_store, rehost=settings.image_store.rehost, tolerance=fleet.tolerance), metrics, uploads=fleet.uploads)
    for name, backend in fleet.backends.items():
        metrics.set_backend_quote(name, backend.quote(REFERENCE_JOB).usd)
        if backend.kind in SOURCES:
            metrics.know_billed_source(name, SOURCES[backend.kind])
    keyring, billing = build_billing(config, env, metrics)
    metrics_access = dataclasses.replace(metrics_access, keys_required=not keyring.open)
    gw = Gateway(
        config=config,
        fleet=fleet,
        health=health,
        dispatcher=dispatcher,
        metrics=metrics,
        images_store=images_store,
        keys=keys,
        resolver=resolver,
        metrics_access=metrics_access,
        store=store,
        keyring=keyring,
        billing=billing,
        clients=[wire, fetch_client],
        request_log=RequestLogger(log_prompt_length=settings.log_prompts),
        drain=Drain(grace_s=settings.shutdown_grace_s),
        jobs=open_jobs(settings, env),
        idempotency=Idempotency(store, metrics, ttl_s=settings.idempotency_ttl_s),
        files=Files(store, images_store, settings),
    )
    return gw


def build_billing(config: GatewayConfig, env: Mapping[str, str], metrics: GatewayMetrics) -> tuple[KeyRing, Billing]:
    """Keys, rate limits and budgets (in Redis when `REDIS_URL` is set) and the usage ledger."""
    try:
        keyring = KeyRing.from_env(env, {b.name for b in config.backends})
    except KeysFileError as exc:
        raise ConfigError(str(exc)) from None
    environment = Settings.from_env(env)
    redis_url = environment.redis_url or None
    namespace = environment.state_namespace or "default"
    budgets = RedisBudgets(redis_url, namespace=namespace) if redis_url else MemoryBudgets()
    ledger_path = environment.usage_ledger or config.settings.usage_ledger
    if ledger_path and ledger_path != ":memory:" and not Path(ledger_path).is_absolute():
        # Beside providers.yaml, unless that is the copy shipped inside an installed
        # package: a ledger is never written into site-packages, so it goes in the
        # working directory then.
        shipped = shipped_config()
        packaged = config.path.resolve() == shipped.resolve() and shipped.parent.name == "defaults"
        ledger_path = str((Path.cwd() if packaged else config.path.parent) / ledger_path)
    try:
        store = open_ledger(environment.database_url or None, ledger_path)
    except Exception as exc:  # noqa: BLE001 - a driver's connect or file error; the URL (and any password) stays out
        where = "DATABASE_URL (PostgreSQL)" if environment.database_url else f"gateway.usage_ledger ({ledger_path})"
        raise ConfigError(f"usage ledger: cannot open {where}: {type(exc).__name__}") from None
    # With Redis, each settle appends its row to the ledger stream with the budget, atomically; every replica drains it.
    stream = LedgerStream(redis_url, namespace=namespace, claim_idle_s=float(environment.ledger_claim_idle_s)) if redis_url else None
    ledger = Ledger(store, stream=stream, metrics=metrics)
    return keyring, Billing(keyring, RateLimiter(redis_url, namespace=namespace), budgets, ledger, metrics)


def startup_report(gw: Gateway) -> list[str]:
    """What the operator should know at start-up: what is enabled, what is not, and why."""
    lines = []
    for name, backend in sorted(gw.fleet.backends.items()):
        lines.append(f"backend {name} ({backend.kind}): enabled, {backend.sheet.basis} pricing")
    for name, reason in sorted(gw.fleet.disabled.items()):
        lines.append(f"backend {name}: disabled ({reason})")
    if not gw.config.settings.public_base_url:
        lines.append(f"no public base URL: signed image URLs point at this server's bound address; set gateway.public_base_url or {PUBLIC_BASE_URL_ENV}")
    if gw.keyring.open:
        lines.append("KLEIN_GATEWAY_KEYS is not set: the gateway is open to anyone who can reach it")
    if gw.metrics_access.closed:
        lines.append("caller keys are required and neither KLEIN_METRICS_TOKEN nor KLEIN_METRICS_PORT is set: /metrics answers 401 on this port")
    if gw.keyring.path is not None:
        lines.append(f"keys file {gw.keyring.path}: re-read on SIGHUP and when it changes")
    lines.append(f"usage ledger: {gw.billing.ledger.store.dialect}")
    return lines


def _reload_keys_on_sighup(keyring: KeyRing) -> None:
    if keyring.path is None or not hasattr(signal, "SIGHUP"):
        return
    import asyncio
    import contextlib

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keyring.reload)


def create_app(
    config_path: str | Path | None = None,  # None: found as gateway.config.find_config says
    pricing_dir: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    probes: bool = True,
    metrics: GatewayMetrics | None = None,
    drain_on_sigterm: bool = False,
) -> Litestar:
    """`drain_on_sigterm`: the first SIGTERM drains this process (gateway.dispatch.shutdown) before
    the server exits; set where the app owns its process (`klein-gateway serve`)."""
    env = os.environ if env is None else env
    config = load_config(config_path, pricing_dir, env)
    public_base_url = Settings.from_env(env).public_base_url
    if public_base_url:
        config.settings.public_base_url = public_base_url
    gw = build_gateway(config, env, transport=transport, metrics=metrics)
    gw.batches = BatchRunner(gw, BatchStore(gw.store, retention_s=config.settings.file_retention_s), batches.line_parser(gw))

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        for line in startup_report(gw):
            (log.warning if "disabled" in line or "open to anyone" in line else log.info)(line)
        prober = Prober({n: b.adapter for n, b in gw.fleet.backends.items()}, gw.health, {b.name: b.config.probe for b in config.enabled}) if probes else None
        if prober is not None:
            prober.start()
        await gw.billing.start()
        await gw.health.start()  # the local health copy: refreshed in the background, fed by pub/sub
        _reload_keys_on_sighup(gw.keyring)
        draining: set[asyncio.Task[None]] = set()  # holds the drain task while it runs

        def start_drain() -> None:
            draining.add(asyncio.ensure_future(drain_then_exit(gw, exit_now)))

        uninstall, exit_now = on_sigterm(start_drain, gw.drain.hurry) if drain_on_sigterm else (lambda: None, lambda: None)
        worker = JobWorker(gw, gw.jobs, resolver=gw.resolver)
        gw.jobs.on_cancel = worker.cancel_requested
        worker.start()
        gw.batches.start()
        gw.ready = True
        try:
            yield
        finally:
            uninstall()
            gw.ready = False
            await gw.batches.stop()
            await worker.stop()
            if prober is not None:
                await prober.stop()
            await gw.close()
            await asyncio.to_thread(gw.request_log.close)  # every request line is on the stream before the process goes

    app = Litestar(
        route_handlers=[*openai.ROUTES, *jobs.ROUTES, *extensions.ROUTES, *usage.ROUTES, *files.ROUTES, *batches.ROUTES, *openapi.ROUTES],
        lifespan=[lifespan],
        exception_handlers={GatewayError: gateway_error_handler, HTTPException: http_exception_handler, Exception: internal_error_handler},
        before_send=[stamp_request_id],
        request_max_body_size=config.settings.max_body_bytes,
        openapi_config=None,
        logging_config=None,  # logs are ours: one JSON line per request (gateway.observability.logs)
        debug=False,
    )
    app.state.gateway = gw
    return app


async def drain_then_exit(gw: Gateway, exit_now: Callable[[], None]) -> None:
    """SIGTERM: refuse new work, wait for what is in flight (cancelling it at the grace), then exit."""
    in_flight = gw.busy
    gw.drain.begin()
    log.warning("SIGTERM: draining %d request(s) in flight, at most %gs", in_flight, gw.drain.grace_s)
    cancelled = await gw.drain.settle(lambda: gw.busy)
    gw.metrics.record_shutdown_cancelled(cancelled)
    if cancelled:
        log.warning("shutdown grace ended: cancelled %d request(s) still running", cancelled)
    else:
        log.info("drained: every request in flight finished")
    exit_now()


def app_from_env() -> Litestar:
    """Factory for `uvicorn --factory gateway.app:app_from_env` (several workers).

    Each worker is a fresh process, so it sets up its own JSON, secret-scrubbing logs."""
    environment = Settings.from_env()
    configure_logging(level=environment.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is ours; no per-call noise
    return create_app(environment.config or None, environment.pricing or None, drain_on_sigterm=True)
