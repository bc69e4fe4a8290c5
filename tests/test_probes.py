"""The prober: free probes on an interval, bounded, recorded, never a generation."""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal

import pytest

from gateway.domain.job import ImageJob
from gateway.health.probes import Prober, ProbeSettings
from gateway.health.tracker import HealthTracker
from gateway.health.view import BreakerState
from gateway.providers.base import Adapter, AdapterSettings, FailureClass, ProbeResult, ProviderError, ProviderResult
from gateway.state import MemoryStore


class FakeAdapter(Adapter):
    """Counts probes; fails the test if anything asks it to generate."""

    kind = "fake"

    def __init__(self, name: str, results: list[ProbeResult | BaseException] | None = None, delay: float = 0.0) -> None:
        super().__init__(AdapterSettings(name=name, base_url="http://127.0.0.1:9", credential=None), wire=None)  # type: ignore[arg-type]  # never sends: the probe is scripted
        self.results = results or [ProbeResult(ok=True)]
        self.delay = delay
        self.probes = 0
        self.generations = 0

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        self.generations += 1
        raise AssertionError("a probe must never generate")

    async def probe(self) -> ProbeResult:
        self.probes += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        result = self.results[min(self.probes, len(self.results)) - 1]
        if isinstance(result, BaseException):
            raise result
        return result


def tracker(*names: str, kind: str = "fake") -> HealthTracker:
    return HealthTracker(MemoryStore(), {}, {n: kind for n in names})


FAST = ProbeSettings(interval_s=0.05, jitter=0.0, timeout_s=0.5)


async def test_probes_run_on_the_interval_and_stop_cleanly() -> None:
    fast, slow = FakeAdapter("fast"), FakeAdapter("slow")
    prober = Prober([fast, slow], tracker("fast", "slow"), {"fast": FAST, "slow": FAST.model_copy(update={"interval_s": 10})})
    prober.start()
    prober.start()  # idempotent: no second loop
    await asyncio.sleep(0.32)
    await prober.stop()
    assert 3 <= fast.probes <= 8
    assert slow.probes == 1  # probed at start, then waits its own interval
    assert not prober.running
    stopped_at = fast.probes
    await asyncio.sleep(0.12)
    assert fast.probes == stopped_at
    assert fast.generations == slow.generations == 0
    await prober.stop()  # stopping twice is harmless


async def test_disabled_backends_are_not_probed() -> None:
    on, off = FakeAdapter("on"), FakeAdapter("off")
    prober = Prober({"on": on, "off": off}, tracker("on", "off"), {"on": FAST, "off": FAST.model_copy(update={"enabled": False})})
    assert set(await prober.probe_all()) == {"on"}
    prober.start()
    await asyncio.sleep(0.08)
    await prober.stop()
    assert off.probes == 0 and on.probes >= 2


async def test_jitter_spreads_the_first_probe_over_the_jitter_window() -> None:
    adapters = [FakeAdapter(f"b{i}") for i in range(20)]
    settings = ProbeSettings(interval_s=1.0, jitter=0.5, timeout_s=0.5)
    prober = Prober(adapters, tracker(*(a.name for a in adapters)), settings, rng=random.Random(7))
    prober.start()
    await asyncio.sleep(0.2)
    early = sum(a.probes for a in adapters)
    await prober.stop()
    assert 0 < early < 20  # some have probed, others still wait their jittered start


async def test_probe_live_figures_reach_the_routers_view() -> None:
    live = {"estimated_wait_s": 2.25, "queue_depth": 3, "cost": {"marginal_usd_per_image": 0.0004}}
    local = FakeAdapter("local", [ProbeResult(ok=True, live=live)])
    health = tracker("local", kind="local")
    await Prober([local], health, FAST).probe_all()
    view = (await health.views(["local"]))["local"]
    assert view.estimated_wait_s == 2.25
    assert view.live_usd_per_image == Decimal("0.0004")
    assert (await health.describe(["local"]))["local"]["live"]["queue_depth"] == 3


async def test_a_good_probe_clears_rejected_credentials() -> None:
    fal = FakeAdapter("fal", [ProbeResult(ok=True)])
    health = tracker("fal")
    await health.record_failure("fal", ProviderError(FailureClass.REFUSED, "HTTP 401", status=401, credentials_invalid=True))
    assert (await health.views(["fal"]))["fal"].credentials_invalid
    await Prober([fal], health, FAST).probe_all()
    assert not (await health.views(["fal"]))["fal"].credentials_invalid
    assert await health.acquire("fal") is not None


@pytest.mark.parametrize(
    ("adapter", "detail"),
    [
        (FakeAdapter("hang", delay=5.0), "probe timed out after 0.1s"),
        (FakeAdapter("boom", [RuntimeError("secret https://internal/x")]), "probe raised RuntimeError"),
        (FakeAdapter("refused", [ProviderError(FailureClass.REFUSED, "HTTP 503: busy", status=503)]), "refused refused the request (HTTP 503): unavailable"),
        (FakeAdapter("down", [ProbeResult(ok=False, detail="HTTP 500")]), "HTTP 500"),
    ],
)
async def test_failed_probes_are_bounded_recorded_and_say_why(adapter: FakeAdapter, detail: str) -> None:
    health = tracker(adapter.name)
    prober = Prober([adapter], health, ProbeSettings(interval_s=1, jitter=0, timeout_s=0.1))
    started = time.monotonic()
    result = await prober.probe(adapter.name)
    assert time.monotonic() - started < 1.0
    assert not result.ok and result.detail == detail and result.latency_s is not None
    last = (await health.describe([adapter.name]))[adapter.name]["last_probe"]
    assert last["ok"] is False and "internal" not in last["detail"]


async def test_a_probe_that_keeps_failing_opens_the_breaker_and_the_loop_survives_errors() -> None:
    flaky = FakeAdapter("flaky", [RuntimeError("x"), ProbeResult(ok=False), RuntimeError("y"), ProbeResult(ok=False)])
    health = tracker("flaky")
    prober = Prober([flaky], health, FAST)
    prober.start()
    await asyncio.sleep(0.25)
    await prober.stop()
    assert flaky.probes >= 4
    assert (await health.views(["flaky"]))["flaky"].state is BreakerState.OPEN
    assert flaky.generations == 0
