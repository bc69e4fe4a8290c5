"""Deadlines: `x-klein-deadline-ms` bounds a request, and work still pending at it is cancelled.

- The budget header bounds the whole request, however slow every backend is:
  a 504 `deadline_exceeded` envelope, no later than the deadline plus a second.
- A job still running (or queued) at the deadline is cancelled where the
  provider has a cancel (fal, Replicate); Runflow's cancel is admin-only and
  off by default (gateway/providers/runflow.py `admin_cancel`), so nothing is
  sent there. Provider-side deadlines (fal's X-Fal-Request-Timeout,
  Replicate's Cancel-After) are turned off for that test, so every cancel
  counted is the gateway's; with them on, fal drops a job no runner started
  in time by itself, unbilled.
- A request its caller abandons (the connection closes mid-request) after
  its job was submitted does not cancel it: the job may bill, so it runs to
  its end and is settled as if the caller had stayed (tests/test_abandoned_work.py;
  docs/design.md#abandoned-requests). It is counted as 499, not as a 5xx.

The emulators count what they saw (`requests` by route, and `cancels`: the
cancels that stopped a job), so every claim is checked on the provider's
side. Everything runs on 127.0.0.1; the gateway is in-process (uvicorn in a
thread), the emulators are in a thread of their own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.emulators import EmulatorFleet
from tests.gateway_support import PROVIDERS_YAML, ServerThread, make_app, send_then_abandon, wait_until

# 1024x1024: a size every backend can make exactly (Replicate only makes its 1 MP table).
BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "url"}
SLOW_JOB = {"job": {"run_ms": 30_000}}  # far beyond every deadline used here
QUEUED_JOB = {"job": {"queue_ms": 30_000}}


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread()
    yield fleet
    fleet.stop_thread()


@contextlib.contextmanager
def serving(fleet: EmulatorFleet, config: Path = PROVIDERS_YAML) -> Iterator[ServerThread]:
    """A fresh gateway (fresh breakers and metrics) over clean emulators."""
    fleet.reset()
    with ServerThread(make_app(env=fleet.env(), config=config)) as server:
        yield server


@pytest.fixture
def server(fleet: EmulatorFleet) -> Iterator[ServerThread]:
    with serving(fleet) as server:
        yield server


def config_with(tmp_path_factory: pytest.TempPathFactory, options: dict[str, dict]) -> Path:
    """The shipped providers.yaml with some adapters' `options:` changed, and no
    `expected_latency_s` priors: these tests are about what happens at the
    deadline, so a backend is tried whatever its expected latency (routing's
    deadline skip is tested in tests/test_routing.py and tests/test_deadline_isolation.py)."""
    root = tmp_path_factory.mktemp("deadlines")
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    for backend in raw["backends"].values():
        backend.pop("expected_latency_s", None)
    for backend, changes in options.items():
        raw["backends"][backend].setdefault("options", {}).update(changes)
    (root / "providers.yaml").write_text(yaml.safe_dump(raw))
    (root / "pricing").symlink_to(PROVIDERS_YAML.parent / "pricing")
    return root / "providers.yaml"


@pytest.fixture(scope="module")
def provider_side_deadlines_off(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No X-Fal-Request-Timeout and no Replicate Cancel-After: the providers keep
    a pending job until told otherwise, so any cancel they see is the gateway's."""
    return config_with(tmp_path_factory, {"fal": {"start_timeout_s": None}, "replicate": {"cancel_after": None}})


@pytest.fixture(scope="module")
def replicate_without_wait(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped providers.yaml with Replicate's `Prefer: wait` off: the create
    answers at once with the prediction id, which is then polled."""
    return config_with(tmp_path_factory, {"replicate": {"prefer_wait_s": 0}})


def set_knobs(fleet: EmulatorFleet, name: str, patch: dict) -> None:
    resp = httpx.post(f"{fleet[name].base_url}/_admin/knobs", json=patch, timeout=5)
    assert resp.status_code == 200, resp.text


def stats(fleet: EmulatorFleet, name: str) -> dict:
    return httpx.get(f"{fleet[name].base_url}/_admin/stats", timeout=5).json()


def pinned(backend: str) -> dict:
    return {**BODY, "model": f"{backend}/flux-2-klein-4b"}


@pytest.mark.parametrize("deadline_ms", [800, 1600])
def test_deadline_header_bounds_a_request_every_backend_is_too_slow_for(fleet: EmulatorFleet, server: ServerThread, deadline_ms: int) -> None:
    for name in fleet.emulators:
        set_knobs(fleet, name, SLOW_JOB)
    t0 = time.monotonic()
    resp = httpx.post(f"{server.url}/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": str(deadline_ms)}, timeout=30)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["code"] == "deadline_exceeded" and error["type"] == "server_error"
    assert deadline_ms / 1000 * 0.9 <= elapsed < deadline_ms / 1000 + 1.0, elapsed


def test_a_job_that_fits_its_deadline_succeeds_and_is_not_cancelled(fleet: EmulatorFleet, server: ServerThread) -> None:
    set_knobs(fleet, "fal", {"job": {"queue_ms": 50, "run_ms": 150}})
    resp = httpx.post(f"{server.url}/v1/images/generations", json=pinned("fal"), headers={"x-klein-deadline-ms": "5000"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "fal"
    time.sleep(0.1)
    assert stats(fleet, "fal")["requests"].get("cancel", 0) == 0


# Who cancels a job still pending at the deadline: fal (PUT cancel_url) and
# Replicate (POST .../cancel) do; Runflow's cancel is admin-only and off by default.
CANCELS_AT_DEADLINE = {"fal": True, "replicate": True, "runflow": False}


@pytest.mark.parametrize("phase", ["running", "queued"])
def test_job_still_pending_at_the_deadline_is_cancelled_where_the_provider_allows(fleet: EmulatorFleet, provider_side_deadlines_off: Path, phase: str) -> None:
    """One request pinned to each async provider, side by side, each with 1200 ms."""

    def one(backend: str) -> tuple[int, float]:
        t0 = time.monotonic()
        resp = httpx.post(f"{server.url}/v1/images/generations", json=pinned(backend), headers={"x-klein-deadline-ms": "1200"}, timeout=30)
        return resp.status_code, time.monotonic() - t0

    with serving(fleet, provider_side_deadlines_off) as server:
        for backend in CANCELS_AT_DEADLINE:
            set_knobs(fleet, backend, SLOW_JOB if phase == "running" else QUEUED_JOB)
        with ThreadPoolExecutor(len(CANCELS_AT_DEADLINE)) as pool:
            answers = dict(zip(CANCELS_AT_DEADLINE, pool.map(one, CANCELS_AT_DEADLINE), strict=True))
        for backend, (status, elapsed) in answers.items():
            assert status == 504, (backend, status)
            assert elapsed < 2.2, (backend, elapsed)
        cancelling = [b for b, cancels in CANCELS_AT_DEADLINE.items() if cancels]
        assert wait_until(lambda: all(stats(fleet, b)["cancels"] >= 1 for b in cancelling), timeout=3.0), {b: stats(fleet, b) for b in cancelling}
    for backend, cancels in CANCELS_AT_DEADLINE.items():
        seen = stats(fleet, backend)
        assert seen["requests"].get("cancel", 0) == (1 if cancels else 0), (backend, seen)
        assert seen["cancels"] == (1 if cancels else 0), (backend, seen)
        assert seen["paid_calls"] == 1, (backend, seen)  # submitted once, never again


@pytest.mark.parametrize("deadline_ms", [900, 2000])
def test_replicates_held_create_returns_the_prediction_id_before_the_deadline(fleet: EmulatorFleet, provider_side_deadlines_off: Path, deadline_ms: int) -> None:
    """The shipped `Prefer: wait=10` against a prediction that takes 10 s: the
    hold ends a margin before the deadline (or is not asked for), so the
    create returns the prediction's id in time and the gateway cancels it.
    A hold of a whole second under a 900 ms deadline used to be cut by the
    deadline, leaving a prediction nobody could cancel or follow."""
    with serving(fleet, provider_side_deadlines_off) as server:
        set_knobs(fleet, "replicate", {"job": {"run_ms": 10_000}})
        resp = httpx.post(f"{server.url}/v1/images/generations", json=pinned("replicate"), headers={"x-klein-deadline-ms": str(deadline_ms)}, timeout=30)
        assert resp.status_code == 504, resp.text
        assert wait_until(lambda: stats(fleet, "replicate")["cancels"] == 1, timeout=3.0), stats(fleet, "replicate")
    assert stats(fleet, "replicate")["paid_calls"] == 1


def test_fal_drops_a_queued_job_at_the_time_the_gateway_gave_it_so_none_is_billed(fleet: EmulatorFleet, server: ServerThread) -> None:
    """The shipped fal options send the attempt's time as X-Fal-Request-Timeout:
    a job no runner started by then is dropped by fal itself (not billed), and
    the request ends before its deadline with nothing to cancel."""
    set_knobs(fleet, "fal", QUEUED_JOB)
    t0 = time.monotonic()
    resp = httpx.post(f"{server.url}/v1/images/generations", json=pinned("fal"), headers={"x-klein-deadline-ms": "3000"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["attempts"][0]["outcome"] == "failed"
    assert resp.headers["x-klein-cost-usd"] == "0"
    assert elapsed < 3.0
    time.sleep(0.1)
    assert stats(fleet, "fal")["requests"].get("cancel", 0) == 0


@pytest.fixture(scope="module")
def fal_polled_slowly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fal polled 0.7 s, 1.75 s and 3.15 s in: a job fal drops at its start deadline
    (2 s in) would be seen only after an attempt given 2.45 s has ended."""
    path = config_with(tmp_path_factory, {})
    raw = yaml.safe_load(path.read_text())
    raw["backends"]["fal"]["timeouts"] = {"connect": 5, "request": 30, "poll_interval": 0.7, "max_poll_interval": 1.4}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_fal_job_dropped_at_its_start_deadline_as_the_attempt_ends_is_known_unbilled_and_the_next_backend_serves(fleet: EmulatorFleet, fal_polled_slowly: Path) -> None:
    """The attempt runs out just after fal dropped the job, so the gateway's cancel
    meets ALREADY_COMPLETED: the job's end (request_timeout, not billed) makes that
    as good as a confirmed cancel, so the request fails over instead of ending in
    502 outcome_unknown, and nothing is reported possibly billed."""
    fleet.reset()
    env = {k: v for k, v in fleet.env().items() if "LOCAL" not in k and "REPLICATE" not in k}  # fal first, then empiriolabs
    with ServerThread(make_app(env=env, config=fal_polled_slowly)) as server:
        set_knobs(fleet, "fal", QUEUED_JOB)
        resp = httpx.post(f"{server.url}/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "3500"}, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-klein-backend"] == "empiriolabs"
        assert "x-klein-possibly-billed-usd" not in resp.headers
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'klein_upstream_attempts_total{backend="fal",outcome="unknown_outcome"} 1.0' in metrics  # the race did happen
    assert not [line for line in metrics.splitlines() if line.startswith("klein_possibly_billed_usd_total{") and not line.endswith(" 0.0")]
    seen = stats(fleet, "fal")
    assert seen["requests"].get("cancel") == 1 and seen["cancels"] == 0 and seen["jobs_open"] == 0, seen


SHORT_JOB = {"job": {"run_ms": 1500}}  # ends long before the deadline; the caller leaves first


def finished(server: ServerThread) -> list[str]:
    """The klein_requests_total lines of generations: a request is counted when its handler ends."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return [line for line in text.splitlines() if line.startswith("klein_requests_total{") and 'route="generations"' in line]


@pytest.mark.parametrize(
    "backend,config",
    [
        pytest.param("fal", None, id="fal"),
        pytest.param("replicate", None, id="replicate-prefer-wait"),
        pytest.param("replicate", "replicate_without_wait", id="replicate-polling"),
    ],
)
def test_request_abandoned_by_its_caller_after_submitting_runs_its_job_to_the_end_uncancelled(fleet: EmulatorFleet, request: pytest.FixtureRequest, backend: str, config: str | None) -> None:
    """Cancelling would not unbill a job that ran (Runflow has no cancel, a cancel
    may come too late), so the gateway keeps what it paid for: see tests/test_abandoned_work.py."""
    path = request.getfixturevalue(config) if config else PROVIDERS_YAML
    with serving(fleet, path) as server:
        set_knobs(fleet, backend, SHORT_JOB)
        send_then_abandon(server.url, pinned(backend), after_s=0.6, headers={"x-klein-deadline-ms": "20000"})
        assert stats(fleet, backend)["paid_calls"] == 1
        assert wait_until(lambda: bool(finished(server)), timeout=5.0)
        seen = stats(fleet, backend)
        assert seen["cancels"] == 0 and seen["requests"].get("cancel", 0) == 0, seen
        assert seen["paid_calls"] == 1, seen


def test_abandoned_request_is_counted_as_client_closed_not_as_a_server_error(fleet: EmulatorFleet, server: ServerThread) -> None:
    set_knobs(fleet, "fal", SHORT_JOB)
    send_then_abandon(server.url, pinned("fal"), after_s=0.6, headers={"x-klein-deadline-ms": "20000"})
    assert wait_until(lambda: bool(finished(server)), timeout=5.0)
    lines = finished(server)
    assert not [line for line in lines if 'status_class="5xx"' in line], lines
    assert [line for line in lines if 'status_class="4xx"' in line], lines


# A body that arrives 1 KiB every 50 ms: every read is far inside any per-read
# timeout, yet a padded image (about 300 KiB as base64) takes some 15 s whole.
TRICKLE = {"trickle": {"chunk_bytes": 1024, "interval_ms": 50}, "pad_to_bytes": 200_000}


def test_a_trickling_response_is_cut_at_the_attempts_time_and_the_next_backend_serves(fleet: EmulatorFleet, server: ServerThread) -> None:
    """The cheapest backend (local) trickles its answer; the attempt ends at its
    share of the deadline, whatever httpx's per-read timeout would do, and the
    next backend serves within the deadline. The local attempt was sent and
    its outcome is unknown: it is reported as possibly billed, not as billed."""
    set_knobs(fleet, "local", TRICKLE)
    t0 = time.monotonic()
    resp = httpx.post(f"{server.url}/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "4000"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] != "local"
    assert elapsed < 4.0, elapsed
    assert resp.headers["x-klein-attempts"] == "2"
    assert float(resp.headers["x-klein-possibly-billed-usd"]) > 0
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'klein_upstream_attempts_total{backend="local",outcome="unknown_outcome"} 1.0' in metrics
    assert 'klein_possibly_billed_usd_total{backend="local"}' in metrics


def test_when_every_backend_trickles_the_request_ends_at_its_deadline(fleet: EmulatorFleet, server: ServerThread) -> None:
    for name in fleet.emulators:
        set_knobs(fleet, name, TRICKLE)
    t0 = time.monotonic()
    body = {**BODY, "response_format": "b64_json"}  # so hosted backends' image files are downloaded, trickling too
    resp = httpx.post(f"{server.url}/v1/images/generations", json=body, headers={"x-klein-deadline-ms": "2500"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "deadline_exceeded"
    assert elapsed < 2.5 + 0.5, elapsed
