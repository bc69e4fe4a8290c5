"""The fleet: in the caller's loop, in a thread, and as `python -m tests.emulators`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.emulators import EmulatorFleet, EmulatorKnobs, JobTiming

ROOT = Path(__file__).resolve().parents[2]


async def test_fleet_in_the_running_loop_serves_and_stops():
    async with EmulatorFleet(["fal", "local"], keys={"local": "local-secret"}, knobs={"fal": EmulatorKnobs(job=JobTiming(run_ms=50))}) as mine:
        env = mine.env()
        assert set(env) == {"KLEIN_FAL_BASE_URL", "FAL_KEY", "KLEIN_LOCAL_URL"}
        assert env["KLEIN_FAL_BASE_URL"].startswith("http://127.0.0.1:")
        assert mine["fal"].knobs.job.run_ms == 50
        async with httpx.AsyncClient() as client:
            ok = await client.post(env["KLEIN_FAL_BASE_URL"] + "/fal-ai/flux-2/klein/4b", json={"prompt": "x"}, headers={"Authorization": f"Key {env['FAL_KEY']}"})
            assert ok.status_code == 200
            body = {"prompt": "x", "width": 256, "height": 256}
            denied = await client.post(env["KLEIN_LOCAL_URL"] + "/v1/images/generations", json=body)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "missing_api_key"
            allowed = await client.post(env["KLEIN_LOCAL_URL"] + "/v1/images/generations", json=body, headers={"Authorization": "Bearer local-secret"})
            assert allowed.status_code == 200
        url = env["KLEIN_FAL_BASE_URL"]
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url + "/_admin/stats")


def test_session_fleet_env_names_every_backend_and_key(fleet):
    env = fleet.env()
    assert set(env) == {
        "KLEIN_FAL_BASE_URL",
        "KLEIN_REPLICATE_BASE_URL",
        "KLEIN_RUNFLOW_BASE_URL",
        "KLEIN_EMPIRIOLABS_BASE_URL",
        "KLEIN_LOCAL_URL",
        "FAL_KEY",
        "REPLICATE_API_TOKEN",
        "RUNFLOW_API_KEY",
        "EMPIRIOLABS_API_KEY",
    }
    ports = {fleet[name].port for name in fleet.emulators}
    assert len(ports) == 5
    assert env["EMPIRIOLABS_API_KEY"].startswith("sk-empiriolabs-") and env["RUNFLOW_API_KEY"].startswith("rf_live_")


def test_set_knobs_from_another_thread_takes_effect(fleet):
    fleet["empiriolabs"].set_knobs({"faults": {"rate_limited": 1.0}})
    with httpx.Client() as client:
        response = client.post(
            fleet["empiriolabs"].base_url + "/v1/images/generations",
            json={"prompt": "x", "size": "256x256"},
            headers={"Authorization": f"Bearer {fleet['empiriolabs'].key}"},
        )
    assert response.status_code == 429


def test_thread_fleet_stops_cleanly_and_releases_held_requests():
    mine = EmulatorFleet.start_in_thread(["empiriolabs"])
    mine["empiriolabs"].set_knobs({"faults": {"timeout": 1.0, "timeout_hold_s": 60}})
    url = mine["empiriolabs"].base_url
    outcome: list[object] = []

    def hold() -> None:
        try:
            with httpx.Client(timeout=30) as client:
                outcome.append(client.post(url + "/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": f"Bearer {mine['empiriolabs'].key}"}))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=hold)
    waiter.start()
    time.sleep(0.2)
    started = time.monotonic()
    mine.stop_thread()
    assert time.monotonic() - started < 5
    waiter.join(10)
    assert outcome and not waiter.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/_admin/stats")


def test_module_entry_point_prints_env_lines_and_serves():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.emulators", "--only", "runflow,local"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        exports = dict(line.removeprefix("export ").split("=", 1) for line in lines)
        assert set(exports) == {"KLEIN_RUNFLOW_BASE_URL", "RUNFLOW_API_KEY", "KLEIN_LOCAL_URL"}
        assert httpx.get(exports["KLEIN_RUNFLOW_BASE_URL"] + "/v1/health").status_code == 200
        assert httpx.get(exports["KLEIN_LOCAL_URL"] + "/health/live").status_code == 200
    finally:
        proc.terminate()  # this test's own child, by its pid
        proc.wait(10)
