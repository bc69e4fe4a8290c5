"""Free health probes: each backend's `Adapter.probe()` on an interval.

Probes never generate an image (a paid generation to test health is what
BerriAI/litellm#26406 shows, docs/design.md#lessons-from-other-gateways); adapters
implement them with free calls (a model or account endpoint, the local
backend's /v1/info). Each backend has its own loop, so one slow probe delays
no other; intervals carry jitter so replicas do not probe in lock-step; each
probe is bounded by `timeout_s`. Results, live figures included (the local
backend's queue wait and cost per image), go to `HealthTracker.record_probe`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from gateway.health.tracker import HealthTracker
from gateway.providers._caller_text import caller_message_of
from gateway.providers.base import Adapter, ProbeResult, ProviderError
from gateway.redaction import redact

log = logging.getLogger(__name__)

_STOP_RECHECK_S = 0.1


class ProbeSettings(BaseModel):
    """How often and how patiently to probe one backend (providers.yaml `probe:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_s: float = Field(30.0, gt=0)
    jitter: float = Field(0.1, ge=0, le=1, description="each wait is interval_s times 1 +/- jitter")
    timeout_s: float = Field(5.0, gt=0)
    enabled: bool = True


class Prober:
    def __init__(
        self,
        adapters: Mapping[str, Adapter] | Iterable[Adapter],
        tracker: HealthTracker,
        settings: ProbeSettings | Mapping[str, ProbeSettings] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._adapters = dict(adapters) if isinstance(adapters, Mapping) else {a.name: a for a in adapters}
        self._tracker = tracker
        self._settings = settings if settings is not None else ProbeSettings()
        self._rng = rng or random.Random()
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def settings(self, name: str) -> ProbeSettings:
        if isinstance(self._settings, ProbeSettings):
            return self._settings
        return self._settings.get(name, ProbeSettings())

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks.values())

    async def probe(self, name: str) -> ProbeResult:
        """Probe one backend once, bounded, and record the result. Never raises
        for a probe's failure: a probe that raises or times out is a failed probe."""
        adapter, timeout = self._adapters[name], self.settings(name).timeout_s
        started = self._clock()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a
            # result that completed as the caller was cancelled and drops the
            # cancellation, which left stop() waiting on a loop that went on.
            async with asyncio.timeout(timeout):
                result = await adapter.probe()
        except TimeoutError:
            result = ProbeResult(ok=False, detail=f"probe timed out after {timeout:g}s")
        except ProviderError as exc:  # the detail is shown on /v1/backends: the gateway's words only
            log.info("probe of %s failed: %s", name, redact(exc.message))
            result = ProbeResult(ok=False, detail=caller_message_of(name, exc))
        except Exception as exc:  # noqa: BLE001 - the type only: messages may carry URLs
            result = ProbeResult(ok=False, detail=f"probe raised {type(exc).__name__}")
        if result.latency_s is None:
            result = replace(result, latency_s=self._clock() - started)
        await self._tracker.record_probe(name, result)
        return result

    async def probe_all(self) -> dict[str, ProbeResult]:
        """One round over every enabled backend, concurrently."""
        names = [n for n in self._adapters if self.settings(n).enabled]
        results = await asyncio.gather(*(self.probe(n) for n in names))
        return dict(zip(names, results, strict=True))

    def start(self) -> None:
        """One loop per enabled backend; the first probes spread over a jitter."""
        loop = asyncio.get_running_loop()
        for name in self._adapters:
            if self.settings(name).enabled and (name not in self._tasks or self._tasks[name].done()):
                self._tasks[name] = loop.create_task(self._run(name), name=f"probe:{name}")

    async def stop(self) -> None:
        """Cancel every loop and wait until each has ended.

        A cancellation can still be lost inside an adapter (one that awaits
        `asyncio.wait_for` as its call completes), so loops that have not
        ended are cancelled again rather than waited on forever."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        pending = {task for task in tasks if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_STOP_RECHECK_S)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, name: str) -> None:
        settings = self.settings(name)
        await asyncio.sleep(self._rng.uniform(0, settings.jitter * settings.interval_s))
        while True:
            try:
                await self.probe(name)
            except Exception:  # a bug in recording must not end the loop
                log.exception("probe of %s could not be recorded", name)
            await asyncio.sleep(settings.interval_s * (1 + self._rng.uniform(-settings.jitter, settings.jitter)))
