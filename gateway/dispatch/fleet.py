"""The backends in service: adapter, capabilities and price sheet, built from config.

`BackendFleet` owns the shared upstream wire and turns a job into routing
candidates (eligibility, quote, health) for the pure router. What a backend
can do and report comes from its adapter class, never from its name.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from decimal import Decimal

import httpx

from gateway.config import GatewayConfig, ResolvedBackend
from gateway.dispatch.references import fetch_reference
from gateway.dispatch.upload_links import UploadLinks
from gateway.domain.capabilities import Capabilities, eligible
from gateway.domain.job import ImageJob, JobKind
from gateway.domain.native_sizes import SizeTolerance, as_served
from gateway.health.view import HealthView
from gateway.net.wire import Wire
from gateway.providers import adapter_class, capabilities_for
from gateway.providers.base import Adapter, AdapterSettings, Timeouts
from gateway.redaction import register_secrets
from gateway.routing.plan import Candidate
from gateway.routing.pricing import PriceSheet, Quote, bill, quote


@dataclass
class Backend:
    name: str
    kind: str
    adapter: Adapter
    capabilities: Capabilities  # text-to-image
    edit_capabilities: Capabilities
    sheet: PriceSheet
    expected_latency_s: float | None
    fetch_client: httpx.AsyncClient
    baseline_sheet: PriceSheet | None = None

    def _live(self, view: HealthView | None) -> Decimal | None:
        """The live per-image figure, for a backend that reports one and whose probe did."""
        return view.live_usd_per_image if view is not None and self.adapter.reports_live_price else None

    def quote(self, job: ImageJob, view: HealthView | None = None) -> Quote:
        return quote(self.sheet, job, self._live(view))

    def bill(self, job: ImageJob, images: int, view: HealthView | None = None) -> Decimal:
        """What `images` returned images cost, by the same rule (and live figure) as the quote."""
        return bill(self.sheet, job, images, self._live(view))

    def baseline_quote(self, job: ImageJob) -> Decimal | None:
        return quote(self.baseline_sheet, job).usd if self.baseline_sheet is not None else None

    def capabilities_for(self, job: ImageJob) -> Capabilities:
        return self.edit_capabilities if job.kind is JobKind.EDIT else self.capabilities

    def served(self, job: ImageJob, tolerance: SizeTolerance) -> ImageJob:
        """The job at the size this backend would produce (gateway.domain.native_sizes)."""
        return as_served(job, self.capabilities_for(job), tolerance)

    async def prepare(self, job: ImageJob, uploads: UploadLinks | None = None, *, deadline: float | None = None) -> ImageJob:
        """The job as this backend needs it: uploads lent a URL for a backend that
        takes URLs only; URL references fetched for a backend that takes bytes,
        all at once and each within what is left of `deadline` (a
        `time.monotonic()` instant; dispatch also bounds the whole step)."""
        caps = self.capabilities_for(job)
        if not caps.accepts_data_uri_refs and uploads is not None and uploads.available and any(r.url is None for r in job.references):
            return await uploads.lend(job)
        if caps.accepts_url_refs or all(r.data is not None for r in job.references):
            return job
        timeout = max(0.001, deadline - time.monotonic()) if deadline is not None else 10.0
        fetches = [asyncio.ensure_future(fetch_reference(r, self.fetch_client, timeout=timeout)) for r in job.references]
        try:
            refs = await asyncio.gather(*fetches)
        except BaseException:
            for fetch in fetches:  # one failed or the attempt ended: the others are not needed
                fetch.cancel()
            raise
        return replace(job, references=tuple(refs))


class BackendFleet:
    def __init__(self, config: GatewayConfig, wire: Wire, fetch_client: httpx.AsyncClient) -> None:
        self.config = config
        self.wire = wire
        # Credentials read from the variables providers.yaml names (renamed ones
        # too) are scrubbed from logs by value, like the registry's own names.
        register_secrets(b.credential for b in config.backends)
        self.disabled: dict[str, str] = {b.name: b.disabled_reason or "" for b in config.backends if not b.enabled}
        baseline_name = config.settings.baseline_backend
        sheets = {b.name: b.sheet for b in config.backends}
        baseline = sheets.get(baseline_name) if baseline_name else None
        self.backends: dict[str, Backend] = {}
        for resolved in config.enabled:
            self.backends[resolved.name] = build_backend(resolved, wire, fetch_client, baseline)
        self.uploads: UploadLinks | None = None  # set once the image store exists (gateway.app)

    @property
    def tolerance(self) -> SizeTolerance:
        s = self.config.settings
        return SizeTolerance(ratio=s.native_size_ratio_tolerance, pixels=s.native_size_pixel_tolerance)

    @property
    def names(self) -> set[str]:
        return set(self.backends) | set(self.disabled)

    def candidates(self, job: ImageJob, views: dict[str, HealthView]) -> list[Candidate]:
        """Each backend's eligibility and quote for the job at the size it would produce."""
        out = []
        tolerance = self.tolerance
        reachable = self.uploads is not None and self.uploads.available
        for name, backend in self.backends.items():
            view = views.get(name, HealthView(latency_p50_s=backend.expected_latency_s))
            if view.latency_p50_s is None and backend.expected_latency_s is not None:
                view = replace(view, latency_p50_s=backend.expected_latency_s)
            served = backend.served(job, tolerance)
            fit = eligible(served, backend.capabilities_for(served), uploads_reachable=reachable)
            out.append(Candidate(name=name, eligibility=fit, quote=backend.quote(served, view), health=view, job=served))
        return out


def build_backend(resolved: ResolvedBackend, wire: Wire, fetch_client: httpx.AsyncClient, baseline: PriceSheet | None) -> Backend:
    cfg = resolved.config
    t = cfg.timeouts
    settings = AdapterSettings(
        name=resolved.name,
        base_url=resolved.base_url or "",
        credential=resolved.credential,
        timeouts=Timeouts(connect=t.connect, request=t.request, poll_interval=t.poll_interval, max_poll_interval=t.max_poll_interval),
        options=cfg.options,
    )
    adapter = adapter_class(cfg.kind)(settings, wire)
    caps = {k: capabilities_for(cfg.kind, cfg.options, cfg.capabilities, k) for k in JobKind}
    return Backend(resolved.name, cfg.kind, adapter, caps[JobKind.GENERATE], caps[JobKind.EDIT], resolved.sheet, cfg.expected_latency_s, fetch_client, baseline)
