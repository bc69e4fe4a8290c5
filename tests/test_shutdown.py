"""Graceful shutdown of a real `klein-gateway serve` process on SIGTERM.

The providers are loopback emulators slowed by their knobs, so requests are
in flight when the signal lands. What must hold: readiness answers 503 at
once, a new request is refused with 503, Retry-After and `connection: close`,
the requests in flight finish (or, past `shutdown_grace_s`, are cancelled with
their provider jobs and answered 503), and the process exits 0; with one
worker and with several."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.emulators.launcher import EmulatorFleet
from tests.gateway_process import GatewayProcess, write_config

pytestmark = pytest.mark.slow

BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "b64_json"}


@pytest.fixture(scope="module")
def emulators() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread()
    try:
        yield fleet
    finally:
        fleet.stop_thread()


@pytest.fixture(autouse=True)
def _fresh_emulators(emulators: EmulatorFleet) -> None:
    emulators.reset()


def post(url: str, model: str, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={**BODY, "model": model}, timeout=timeout)


def readiness_once_signalled(url: str, within_s: float = 1.5) -> httpx.Response:
    """/readyz as soon as it turns 503. With several workers the supervisor
    passes SIGTERM on at its next check (uvicorn looks every 0.5 s), so a
    worker's readiness flips within that, not within a fixed sleep."""
    until = time.monotonic() + within_s
    while True:
        ready = httpx.get(f"{url}/readyz", timeout=5)
        if ready.status_code == 503 or time.monotonic() > until:
            return ready
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_refuses_new_work_finishes_what_is_in_flight_and_exits_0(tmp_path: Path, emulators: EmulatorFleet, workers: int, request: pytest.FixtureRequest) -> None:
    emulators["local"].set_knobs({"latency": {"ms": 2500}})
    env = emulators.env()
    if workers > 1:  # several workers share their state through Redis, as `serve` requires
        env.update(REDIS_URL=request.getfixturevalue("redis_server").url, KLEIN_STATE_NAMESPACE=f"shutdown-{tmp_path.name}")
    gw = GatewayProcess(tmp_path, write_config(tmp_path / "providers.yaml", shutdown_grace_s=20), env, workers=workers)
    gw.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(post, gw.url, "local/flux-2-klein-4b") for _ in range(2 * workers)]
            time.sleep(1.0)  # every request has reached the (slow) backend
            signalled = time.monotonic()
            gw.sigterm()
            ready = readiness_once_signalled(gw.url)
            refused = post(gw.url, "flux-2-klein-4b", timeout=5)
            answers = [f.result() for f in in_flight]
        rc = gw.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        gw.kill()
    assert (ready.status_code, ready.json()["status"]) == (503, "draining")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text[:200] for a in answers]
    assert rc == 0, gw.logs()[-2000:]
    assert took < 15, f"drain took {took:.1f}s although the work in flight needed about 2s"
    assert "draining" in gw.logs()


def test_work_that_outlives_the_grace_is_cancelled_at_the_provider_and_answered_503(tmp_path: Path, emulators: EmulatorFleet) -> None:
    emulators["fal"].set_knobs({"job": {"run_ms": 30_000}})
    gw = GatewayProcess(tmp_path, write_config(tmp_path / "providers.yaml", shutdown_grace_s=1.5), emulators.env())
    gw.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(post, gw.url, "fal/flux-2-klein-4b")
            time.sleep(1.0)
            gw.sigterm()
            answer = stuck.result()
        rc = gw.wait(timeout=20)
    finally:
        gw.kill()
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down", answer.text[:300]
    assert answer.headers["retry-after"] == "1"
    assert emulators["fal"].app.stats.cancels == 1
    assert rc == 0
    assert "cancelled 1 request(s) still running" in gw.logs()


def test_a_second_sigterm_ends_the_grace_at_once(tmp_path: Path, emulators: EmulatorFleet) -> None:
    emulators["fal"].set_knobs({"job": {"run_ms": 30_000}})
    gw = GatewayProcess(tmp_path, write_config(tmp_path / "providers.yaml", shutdown_grace_s=60), emulators.env())
    gw.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post, gw.url, "fal/flux-2-klein-4b")
            time.sleep(1.0)
            gw.sigterm()
            time.sleep(0.5)
            assert gw.process is not None and gw.process.poll() is None  # draining, not gone
            started = time.monotonic()
            gw.sigterm()
            rc = gw.wait(timeout=15)
            took = time.monotonic() - started
            answer = pending.result()
    finally:
        gw.kill()
    assert took < 8, f"the second SIGTERM still waited {took:.1f}s"
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
    assert emulators["fal"].app.stats.cancels == 1 and rc == 0
