"""GET /v1/images/jobs/{id}/events over HTTP, jobs in memory (one process).

uvicorn on 127.0.0.1 and the fal emulator, as in test_jobs_api.py. The
cross-replica case, on Redis, is in test_jobs_replicas.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.observability.metrics import GatewayMetrics
from tests.emulators import EmulatorFleet
from tests.gateway_support import ServerThread, wait_until
from tests.jobs_support import PRICING, config_with, read_events, wait_job

BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Rig:
    def __init__(self, fleet: EmulatorFleet, server: ServerThread, app: Any, metrics: GatewayMetrics) -> None:
        self.fleet, self.server, self.app, self.metrics = fleet, server, app, metrics
        self.http = httpx.Client(timeout=30)

    @property
    def store(self) -> Any:
        return self.app.state.gateway.jobs.store

    def knobs(self, patch: dict[str, Any]) -> None:
        assert self.http.post(f"{self.fleet['fal'].base_url}/_admin/knobs", json=patch).status_code == 200

    def submit(self, key: str = "key-a") -> str:
        resp = self.http.post(f"{self.server.url}/v1/images/generations", json=BODY, headers={"Prefer": "respond-async", **auth(key)})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def events_url(self, job_id: str) -> str:
        return f"{self.server.url}/v1/images/jobs/{job_id}/events"

    def sample(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    fleet = EmulatorFleet.start_in_thread(["fal"])
    config = config_with(tmp_path_factory.mktemp("events"), job_concurrency=4)
    env = {**fleet.env(), "KLEIN_GATEWAY_KEYS": "key-a,key-b"}
    metrics = GatewayMetrics(registry=CollectorRegistry())
    app = create_app(config, PRICING, env=env, probes=False, metrics=metrics)
    try:
        with ServerThread(app) as server:
            yield Rig(fleet, server, app, metrics)
    finally:
        fleet.stop_thread()


def test_a_live_job_streams_each_change_in_order_and_ends_with_the_object_get_answers(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 400, "run_ms": 200}})
    job_id = rig.submit()
    status, got = read_events(rig.http, rig.events_url(job_id), headers=auth("key-a"))
    assert status == 200
    events = [e for e in got if "data" in e]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids)), ids
    assert [e["event"] for e in events] == [e["data"]["status"] for e in events]
    assert events[0]["event"] in ("queued", "running") and events[-1]["event"] == "succeeded"
    assert "running" in [e["event"] for e in events]
    job = rig.http.get(f"{rig.server.url}/v1/images/jobs/{job_id}", headers=auth("key-a")).json()
    assert events[-1]["data"] == job
    # Resuming from a middle event: only the later ones; from the terminal one: 204, so an EventSource stops.
    middle = events[len(events) // 2 - 1] if len(events) > 2 else events[0]
    status, again = read_events(rig.http, rig.events_url(job_id), headers={**auth("key-a"), "Last-Event-ID": middle["id"]})
    assert status == 200 and [e for e in again if "data" in e] == [e for e in events if int(e["id"]) > int(middle["id"])]
    status, _ = read_events(rig.http, rig.events_url(job_id), headers={**auth("key-a"), "Last-Event-ID": events[-1]["id"]})
    assert status == 204


def test_a_job_already_ended_answers_one_event_and_ends(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 0, "run_ms": 0}})
    job_id = rig.submit()
    job = wait_job(rig.http, rig.server.url, job_id, headers=auth("key-a"))
    assert job["status"] == "succeeded"
    status, got = read_events(rig.http, rig.events_url(job_id), headers=auth("key-a"))
    assert status == 200 and len(got) == 1 and got[0]["event"] == "succeeded" and got[0]["data"] == job


def test_only_the_owner_sees_the_stream_and_an_unknown_id_is_404(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 0, "run_ms": 0}})
    job_id = rig.submit("key-a")
    other = rig.http.get(rig.events_url(job_id), headers=auth("key-b"))
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    get = rig.http.get(f"{rig.server.url}/v1/images/jobs/{job_id}", headers=auth("key-b"))
    assert (get.status_code, get.json()["error"]["code"]) == (404, "job_not_found")  # the same answer as GET gives
    unknown = rig.http.get(rig.events_url("imgjob_000000000000"), headers=auth("key-a"))
    assert unknown.status_code == 404
    assert rig.http.get(rig.events_url(job_id)).status_code == 401


def test_a_caller_who_disconnects_leaves_no_waiter_and_counts_as_abandoned(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 4000, "run_ms": 0}})
    job_id = rig.submit()
    abandoned = rig.sample("klein_image_job_event_streams_abandoned_total")
    host, port = "127.0.0.1", rig.server.port
    sock = socket.create_connection((host, port), timeout=5)
    try:
        sock.sendall(f"GET /v1/images/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer key-a\r\n\r\n".encode())
        head = b""
        while b"event: " not in head:
            head += sock.recv(65536)
        assert b"200 OK" in head and b"text/event-stream" in head
        assert wait_until(lambda: rig.store.subscribers == 1)
        assert rig.sample("klein_image_job_event_streams") == 1
    finally:
        sock.close()
    assert wait_until(lambda: rig.store.subscribers == 0), rig.store.subscribers
    assert wait_until(lambda: rig.sample("klein_image_job_event_streams") == 0)
    assert rig.sample("klein_image_job_event_streams_abandoned_total") == abandoned + 1
    assert wait_job(rig.http, rig.server.url, job_id, headers=auth("key-a"))["status"] == "succeeded"  # the job itself runs on
    time.sleep(0.1)
    assert rig.store.subscribers == 0


def test_a_draining_replica_ends_its_streams_for_the_caller_to_resume_elsewhere(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 8000, "run_ms": 0}})
    job_id = rig.submit()
    abandoned = rig.sample("klein_image_job_event_streams_abandoned_total")
    drain = rig.app.state.gateway.drain
    got: list[tuple[int, list[dict[str, Any]]]] = []
    watcher = threading.Thread(target=lambda: got.append(read_events(httpx.Client(timeout=30), rig.events_url(job_id), headers=auth("key-a"))))
    watcher.start()
    try:
        assert wait_until(lambda: rig.store.subscribers == 1)
        started = time.monotonic()
        drain.draining = True
        watcher.join(timeout=10)
        assert not watcher.is_alive() and time.monotonic() - started < 4.0
    finally:
        drain.draining = False
    status, events = got[0]
    assert status == 200 and [e["event"] for e in events if "data" in e][-1] in ("queued", "running")
    assert rig.store.subscribers == 0 and rig.sample("klein_image_job_event_streams_abandoned_total") == abandoned  # ended by the server, not the caller
    assert wait_job(rig.http, rig.server.url, job_id, headers=auth("key-a"), timeout=20)["status"] == "succeeded"
