"""Build the litestar application from providers.yaml and the environment."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from litestar import Litestar
from litestar.exceptions import HTTPException

from gateway.api import extensions, openai, openapi
from gateway.api.errors import gateway_error_handler, http_exception_handler, internal_error_handler, stamp_request_id
from gateway.backends import BackendFleet
from gateway.config import GatewayConfig, load_config
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.health import HealthTracker
from gateway.image_store import ImageStore
from gateway.job import ImageJob, JobKind
from gateway.logs import RequestLogger, configure_logging, register_secrets
from gateway.metrics import GatewayMetrics
from gateway.metrics_access import MetricsAccess
from gateway.pinned import PinnedTransport, SystemResolver
from gateway.probes import Prober
from gateway.results import ResultShaper
from gateway.service import Gateway
from gateway.state import open_store
from gateway.transport import ShardedTransport
from gateway.upload_links import UploadLinks

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
    keys = parse_keys(env.get("KLEIN_GATEWAY_KEYS"))
    metrics_access = MetricsAccess.from_env(env)
    register_secrets([*(b.credential for b in config.backends), *keys, metrics_access.token])  # never in a log line, label or answer
    client = httpx.AsyncClient(transport=transport or ShardedTransport(MAX_UPSTREAM_CONNECTIONS), headers={"user-agent": "klein-gateway/0.1"})
    # Caller URLs are fetched with a separate client that never carries provider state,
    # connecting only to the public address it checked (PinnedTransport).
    resolver = SystemResolver()
    fetch_client = httpx.AsyncClient(transport=transport or PinnedTransport(resolver), follow_redirects=False, trust_env=False, headers={"user-agent": "klein-gateway/0.1"})
    fleet = BackendFleet(config, client, fetch_client)
    store = open_store(env.get("REDIS_URL") or None)
    policies = {b.name: b.config.breaker for b in config.enabled}
    kinds = {b.name: b.config.kind for b in config.enabled}
    health = HealthTracker(store, policies, kinds)
    metrics = metrics or GatewayMetrics(baseline_backend=config.settings.baseline_backend)
    health.on_state_change(lambda name, state: metrics.set_breaker_state(name, state.value))
    settings = config.settings
    images_store = ImageStore(ttl_s=settings.image_url_ttl_s, max_bytes=settings.image_store_bytes, signing_key=(env.get("KLEIN_URL_SIGNING_KEY") or "").encode() or None)
    fleet.uploads = UploadLinks(images_store, settings)
    dispatcher = Dispatcher(fleet.backends, health, ResultShaper(client, images_store), metrics, uploads=fleet.uploads)
    for name, backend in fleet.backends.items():
        metrics.set_backend_quote(name, backend.quote(REFERENCE_JOB).usd)
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
        clients=[client, fetch_client],
        request_log=RequestLogger(log_prompt_length=settings.log_prompts),
    )
    return gw


def startup_report(gw: Gateway) -> list[str]:
    """What the operator should know at start-up: what is enabled, what is not, and why."""
    lines = []
    for name, backend in sorted(gw.fleet.backends.items()):
        lines.append(f"backend {name} ({backend.kind}): enabled, {backend.sheet.basis} pricing")
    for name, reason in sorted(gw.fleet.disabled.items()):
        lines.append(f"backend {name}: disabled ({reason})")
    if not gw.config.settings.public_base_url:
        lines.append(f"no public base URL: signed image URLs point at this server's bound address; set gateway.public_base_url or {PUBLIC_BASE_URL_ENV}")
    if not gw.keys:
        lines.append("KLEIN_GATEWAY_KEYS is not set: the gateway is open to anyone who can reach it")
    return lines


def create_app(
    config_path: str | Path | None = None,  # None: found as gateway.config.find_config says
    pricing_dir: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    probes: bool = True,
    metrics: GatewayMetrics | None = None,
) -> Litestar:
    env = os.environ if env is None else env
    config = load_config(config_path, pricing_dir, env)
    if env.get(PUBLIC_BASE_URL_ENV):
        config.settings.public_base_url = env[PUBLIC_BASE_URL_ENV]
    gw = build_gateway(config, env, transport=transport, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        for line in startup_report(gw):
            (log.warning if "disabled" in line or "open to anyone" in line else log.info)(line)
        prober = Prober({n: b.adapter for n, b in gw.fleet.backends.items()}, gw.health, {b.name: b.config.probe for b in config.enabled}) if probes else None
        if prober is not None:
            prober.start()
        gw.ready = True
        try:
            yield
        finally:
            gw.ready = False
            if prober is not None:
                await prober.stop()
            await gw.close()

    app = Litestar(
        route_handlers=[*openai.ROUTES, *extensions.ROUTES, *openapi.ROUTES],
        lifespan=[lifespan],
        exception_handlers={GatewayError: gateway_error_handler, HTTPException: http_exception_handler, Exception: internal_error_handler},
        before_send=[stamp_request_id],
        request_max_body_size=config.settings.max_body_bytes,
        openapi_config=None,
        logging_config=None,  # logs are ours: one JSON line per request (gateway.logs)
        debug=False,
    )
    app.state.gateway = gw
    return app


def app_from_env() -> Litestar:
    """Factory for `uvicorn --factory gateway.app:app_from_env` (several workers).

    Each worker is a fresh process, so it sets up its own JSON, secret-scrubbing logs."""
    configure_logging(level=os.environ.get("KLEIN_LOG_LEVEL", "INFO").upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is ours; no per-call noise
    return create_app(os.environ.get("KLEIN_CONFIG") or None, os.environ.get("KLEIN_PRICING") or None)
