"""What the job worker needs of the gateway: a narrow interface, so jobs never import the assembly.

`gateway.service.Gateway` satisfies it; a test may hand the worker anything else
that does. Every part named here lives below `gateway.jobs`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol

from gateway.dispatch.attempts import Dispatcher, Outcome
from gateway.dispatch.fleet import BackendFleet
from gateway.dispatch.progress import Progress
from gateway.domain.job import ImageJob
from gateway.money.keys import KeyRing
from gateway.money.tab import Billing, Tab
from gateway.observability.metrics import GatewayMetrics


class Pipeline(Protocol):
    """Run one image job the way a synchronous request runs, and account for it."""

    @property
    def fleet(self) -> BackendFleet: ...

    @property
    def dispatcher(self) -> Dispatcher: ...

    @property
    def metrics(self) -> GatewayMetrics: ...

    @property
    def keyring(self) -> KeyRing: ...

    @property
    def billing(self) -> Billing: ...

    def billed_figure(self, outcome: Outcome | None) -> tuple[Decimal, str] | None:
        """The serving provider's own billed figure and its source, where it gave one."""
        ...

    async def images(self, job: ImageJob, *, started: float, base_url: str, tab: Tab | None = None, keep_images_s: int | None = None, progress: Progress | None = None) -> Outcome:
        """Plan, dispatch and deliver `job`; raises DispatchFailed when every attempt failed.
        `keep_images_s`: how long the images the gateway stores must live; `progress`:
        what the caller learns of the dispatch, and how it asks it to stop (gateway/dispatch/progress.py)."""
        ...
