"""One caller's short deadlines cannot take a backend away from everyone (issue 20).

Twenty requests with `x-klein-deadline-ms: 300` against a Replicate whose
predictions take 3 s used to open its breaker, so another tenant pinned to
Replicate got 503 `no_backend_available`. A timeout the caller's own deadline
caused is not the backend's failure: the breaker stays closed and the other
tenant is served. Once Replicate's latency is known, a deadline shorter than
it is refused with 400 `deadline_too_short` before anything is bought.

The gateway runs in-process (uvicorn in a thread) over the emulators on
127.0.0.1. Replicate's `expected_latency_s` prior is taken out of the config,
so at first nothing is known of its latency and the short requests do reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.money.keys import hash_key
from tests.emulators import EmulatorFleet
from tests.gateway_support import PROVIDERS_YAML, ServerThread, make_app, wait_until

PINNED = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "url", "model": "replicate/flux-2-klein-4b"}
HASTY = {"authorization": "Bearer secret-hasty", "x-klein-deadline-ms": "300"}
PATIENT = {"authorization": "Bearer secret-patient", "x-klein-deadline-ms": "30000"}


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread(["replicate"])
    yield fleet
    fleet.stop_thread()


@pytest.fixture
def server(fleet: EmulatorFleet, tmp_path: Path) -> Iterator[ServerThread]:
    """Two tenants over the emulators; Replicate without a latency prior, its predictions taking 3 s."""
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["backends"]["replicate"].pop("expected_latency_s")
    config = tmp_path / "providers.yaml"
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "pricing").symlink_to(PROVIDERS_YAML.parent / "pricing")
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": name, "key_sha256": hash_key(f"secret-{name}")} for name in ("hasty", "patient")]}))
    fleet.reset()
    resp = httpx.post(f"{fleet['replicate'].base_url}/_admin/knobs", json={"job": {"run_ms": 3000}}, timeout=5)
    assert resp.status_code == 200, resp.text
    with ServerThread(make_app({**fleet.env(), "KLEIN_KEYS_FILE": str(keys)}, config=config)) as server:
        yield server


def stats(fleet: EmulatorFleet) -> dict:
    return httpx.get(f"{fleet['replicate'].base_url}/_admin/stats", timeout=5).json()


def replicate_health(server: ServerThread) -> dict:
    listing = httpx.get(f"{server.url}/v1/backends", headers=PATIENT, timeout=5).json()
    (row,) = [b for b in listing["data"] if b["name"] == "replicate"]
    return row


def quote_reason(server: ServerThread) -> str:
    """Why a 300 ms request would skip Replicate (empty while it would not), as routing sees it."""
    quote = httpx.post(f"{server.url}/v1/images/quote", json=PINNED, headers=HASTY, timeout=5).json()
    (row,) = [b for b in quote["backends"] if b["name"] == "replicate"]
    return str(row["reason"] or "")


def test_short_deadlines_of_one_tenant_leave_the_backend_to_the_others(fleet: EmulatorFleet, server: ServerThread) -> None:
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=HASTY, timeout=15), range(20)))
    assert [a.status_code for a in answers] == [504] * 20, [a.text for a in answers if a.status_code != 504][:2]
    assert stats(fleet)["paid_calls"] == 20
    # Each prediction's id was known (no Prefer hold at 300 ms), so each was cancelled.
    assert wait_until(lambda: stats(fleet)["cancels"] == 20, timeout=10), stats(fleet)

    health = replicate_health(server)
    assert health["state"] == "closed", health
    assert health["window"]["failures"] == 0 and health["latency_samples"] == 0, health  # 0.3 s is no answer time

    served = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=PATIENT, timeout=30)
    assert served.status_code == 200, served.text
    assert served.headers["x-klein-backend"] == "replicate"
    assert stats(fleet)["paid_calls"] == 21

    # Replicate's latency is known now (about 3 s): a 300 ms deadline cannot be met there. Routing reads
    # this process's copy of the health state, refreshed every 250 ms; the quote (free) reads the same copy.
    assert wait_until(lambda: quote_reason(server).startswith("expected latency 3."), timeout=5), quote_reason(server)
    for _ in range(3):
        refused = httpx.post(f"{server.url}/v1/images/generations", json=PINNED, headers=HASTY, timeout=15)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "deadline_too_short", "x-klein-deadline-ms")
        assert "the fastest, replicate, is expected to take 3." in error["message"]
    assert stats(fleet)["paid_calls"] == 21  # nothing more was bought

    quote = httpx.post(f"{server.url}/v1/images/quote", json=PINNED, headers=HASTY, timeout=5).json()
    (row,) = [b for b in quote["backends"] if b["name"] == "replicate"]
    assert row["reason"].startswith("expected latency 3.") and "exceeds the 0.3s deadline" in row["reason"]
    assert quote["chosen"] is None
