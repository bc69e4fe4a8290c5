"""Health probes cost nothing: no probe ever creates paid work on any backend.

The witness is each emulator's own counters (tests/emulators/core.py
Stats): `paid_calls` and `generations` count calls that create billable
work, `free_calls` every other protocol call. The prober runs against every
emulator for many intervals with a tiny interval; afterwards the paid counts
must be zero while the free counts are not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.app import build_gateway, create_app
from gateway.config import load_config
from gateway.health.probes import Prober, ProbeSettings
from gateway.health.tracker import HealthTracker
from gateway.health.view import BreakerState
from gateway.observability.metrics import GatewayMetrics
from gateway.providers.base import ProbeResult
from gateway.state import MemoryStore
from tests.emulators import EmulatorFleet
from tests.emulators.launcher import PROVIDERS
from tests.gateway_support import NO_LEDGER, PROVIDERS_YAML, ServerThread, make_app, wait_until

INTERVAL_S = 0.05
ROUNDS = 5  # probes per backend, at least, before the counters are read
FAST = ProbeSettings(interval_s=INTERVAL_S, jitter=0.2, timeout_s=2.0)


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread()
    yield fleet
    fleet.stop_thread()


@pytest.fixture(autouse=True)
def clean(fleet: EmulatorFleet) -> None:
    fleet.reset()


def stats(fleet: EmulatorFleet) -> dict[str, dict]:
    return {name: httpx.get(f"{fleet[name].base_url}/_admin/stats", timeout=5).json() for name in fleet.emulators}


def assert_nothing_paid(counts: dict[str, dict]) -> None:
    for name, s in counts.items():
        assert s["paid_calls"] == 0, f"{name}: a probe made a paid call: {s['requests']}"
        assert s["generations"] == 0 and s["images"] == 0, f"{name}: a probe generated: {s}"


async def probe_for_rounds(prober: Prober, fleet: EmulatorFleet, rounds: int, timeout: float = 5.0) -> None:
    """Run the probe loops until every emulator has answered `rounds` probes' worth of free calls."""
    prober.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = await asyncio.to_thread(stats, fleet)
            if all(s["free_calls"] >= rounds for s in counts.values()):
                return
            await asyncio.sleep(INTERVAL_S)
        raise AssertionError(f"probes did not reach {rounds} rounds: {counts}")
    finally:
        await prober.stop()


async def test_probing_every_backend_for_many_intervals_makes_no_paid_generation(fleet: EmulatorFleet) -> None:
    env = {**fleet.env(), **NO_LEDGER}
    gw = build_gateway(load_config(PROVIDERS_YAML, env=env), env)
    try:
        assert sorted(gw.fleet.backends) == sorted(PROVIDERS)
        prober = Prober({n: b.adapter for n, b in gw.fleet.backends.items()}, gw.health, FAST)
        await probe_for_rounds(prober, fleet, ROUNDS)
        counts = await asyncio.to_thread(stats, fleet)
        assert_nothing_paid(counts)
        assert all(s["free_calls"] >= ROUNDS for s in counts.values()), counts
        described = await gw.health.describe(gw.fleet.backends)
        for name, row in described.items():
            assert row["last_probe"] is not None and row["last_probe"]["ok"], f"{name}: {row['last_probe']}"
            assert row["state"] == "closed"
    finally:
        await gw.close()


async def test_probes_of_failing_backends_open_breakers_without_a_paid_call(fleet: EmulatorFleet) -> None:
    """Every call (probes included: scope "all") answers 5xx: failed probes in a
    row open each breaker, so no user request is spent finding out, and still
    nothing paid is created."""
    for running in fleet.emulators.values():
        running.set_knobs({"faults": {"server_error": 1.0, "server_error_status": 503, "scope": "all"}})
    env = {**fleet.env(), **NO_LEDGER}
    gw = build_gateway(load_config(PROVIDERS_YAML, env=env), env)
    try:
        prober = Prober({n: b.adapter for n, b in gw.fleet.backends.items()}, gw.health, FAST)
        await probe_for_rounds(prober, fleet, ROUNDS)
        counts = await asyncio.to_thread(stats, fleet)
        assert_nothing_paid(counts)
        views = await gw.health.views(gw.fleet.backends)
        # Runflow's probe is its unauthenticated /v1/health, which the fault also answers 503.
        assert {n: v.state for n, v in views.items()} == {n: BreakerState.OPEN for n in PROVIDERS}
    finally:
        await gw.close()


def test_the_served_app_probes_on_its_configured_interval_and_pays_nothing(fleet: EmulatorFleet, tmp_path: Path) -> None:
    """The wiring in create_app: providers.yaml `probe:` reaches the prober the app runs."""
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    for backend in raw["backends"].values():
        backend["probe"] = {"interval_s": INTERVAL_S, "jitter": 0.2, "timeout_s": 2.0}
    config = tmp_path / "providers.yaml"
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "pricing").symlink_to(PROVIDERS_YAML.parent / "pricing")
    app = create_app(config, env=fleet.env(), probes=True, metrics=GatewayMetrics(registry=CollectorRegistry()))
    with ServerThread(app) as server:
        assert wait_until(lambda: all(s["free_calls"] >= ROUNDS for s in stats(fleet).values()), timeout=5.0), stats(fleet)
        rows = httpx.get(f"{server.url}/v1/backends", timeout=5).json()["data"]
    assert_nothing_paid(stats(fleet))
    assert {r["name"] for r in rows if r.get("last_probe") and r["last_probe"]["ok"]} == set(PROVIDERS)


def test_shipped_app_with_probes_off_calls_no_backend(fleet: EmulatorFleet) -> None:
    """make_app (probes off) serves and answers /v1/backends without touching any backend."""
    with ServerThread(make_app(env=fleet.env())) as server:
        assert httpx.get(f"{server.url}/v1/backends", timeout=5).status_code == 200
        time.sleep(5 * INTERVAL_S)
    counts = stats(fleet)
    assert all(s["free_calls"] == 0 and s["paid_calls"] == 0 for s in counts.values()), counts


class _SignallingAdapter:
    """A probe that answers at once and says so; never generates."""

    name = "signalling"

    def __init__(self) -> None:
        self.probed = asyncio.Event()
        self.probes = 0

    async def probe(self) -> ProbeResult:
        self.probes += 1
        self.probed.set()
        return ProbeResult(ok=True)


async def test_stopping_the_prober_as_a_probe_completes_ends_its_loop() -> None:
    """stop() lands between a probe's completion and its loop resuming. Python
    3.11's asyncio.wait_for returns the finished result there and drops the
    cancellation, so a loop built on it carried on and stop() never returned
    (an app's shutdown hung on it)."""
    adapter = _SignallingAdapter()
    prober = Prober({"signalling": adapter}, HealthTracker(MemoryStore(), {}, {}), ProbeSettings(interval_s=30, jitter=0.0, timeout_s=1))  # type: ignore[dict-item]  # a stand-in with only the probe the prober calls
    prober.start()
    async with asyncio.timeout(2):
        await adapter.probed.wait()  # resumes this test before the probe loop resumes
    try:
        async with asyncio.timeout(2):
            await prober.stop()
    except TimeoutError:
        pytest.fail("Prober.stop() did not end a loop whose cancellation arrived as its probe completed")
    assert not prober.running
    assert adapter.probes == 1


class _CancelSwallowingAdapter(_SignallingAdapter):
    """A probe that eats the first cancellation it gets and answers instead,
    as an adapter awaiting asyncio.wait_for can when its call completes."""

    async def probe(self) -> ProbeResult:
        self.probes += 1
        self.probed.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        return ProbeResult(ok=True)


async def test_stopping_the_prober_ends_a_loop_whose_adapter_swallowed_the_cancellation() -> None:
    adapter = _CancelSwallowingAdapter()
    prober = Prober({"swallowing": adapter}, HealthTracker(MemoryStore(), {}, {}), ProbeSettings(interval_s=30, jitter=0.0, timeout_s=60))  # type: ignore[dict-item]  # a stand-in with only the probe the prober calls
    prober.start()
    async with asyncio.timeout(2):
        await adapter.probed.wait()
    started = time.monotonic()
    try:
        async with asyncio.timeout(2):
            await prober.stop()
    except TimeoutError:
        pytest.fail("Prober.stop() waited on a loop that carried on after its cancellation was swallowed")
    assert time.monotonic() - started < 1.0
    assert not prober.running


async def test_a_probe_refused_for_its_key_marks_the_backend_down_until_a_good_probe():
    from gateway.health.tracker import HealthTracker
    from gateway.providers.base import ProbeResult
    from gateway.state import MemoryStore

    tracker = HealthTracker(MemoryStore(), {}, {"fal": "fal"})
    await tracker.record_probe("fal", ProbeResult(False, "credentials rejected (HTTP 401)", credentials_invalid=True))
    view = (await tracker.views(["fal"]))["fal"]
    assert not view.available and view.why_unavailable == "credentials rejected"
    assert await tracker.acquire("fal") is None
    await tracker.record_probe("fal", ProbeResult(True, "key accepted"))
    assert (await tracker.views(["fal"]))["fal"].available
