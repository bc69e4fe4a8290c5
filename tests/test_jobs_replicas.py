"""Async jobs and idempotency keys across gateway processes sharing one Redis.

Three `python -m gateway.cli serve` processes on loopback, one
`redis-server` and the fal emulator with a slow queue (the only backend with
a credential). The emulator's paid-generation counter is the witness: a
crash must not make anyone pay twice, and neither may twenty racing retries.
Every process is stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_client
import redis.asyncio as aioredis

from gateway.domain.job import ImageJob, JobKind
from gateway.jobs.model import JobRecord, job_to_dict, new_job_id
from gateway.jobs.queue import RedisJobQueue
from gateway.jobs.store import RedisJobStore
from tests.emulators import EmulatorFleet
from tests.jobs_support import PRICING, TERMINAL, config_with, read_events, wait_job
from tests.redis_server import RedisServer, redis_available
from tests.test_resilience_replicas import Replica, start_replica, wait_ready

BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url", "n": 1}
JOBS = 30
VISIBILITY_S = 3.0

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]


@dataclass
class Rig:
    fleet: EmulatorFleet
    redis: RedisServer
    namespace: str
    replicas: list[Replica]
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def fal(self) -> dict[str, Any]:
        return self.http.get(f"{self.fleet['fal'].base_url}/_admin/stats").json()

    def knobs(self, patch: dict[str, Any]) -> None:
        assert self.http.post(f"{self.fleet['fal'].base_url}/_admin/knobs", json=patch).status_code == 200

    def record(self, job_id: str) -> dict[str, Any]:
        with redis_client.Redis.from_url(self.redis.url, decode_responses=True) as r:
            return json.loads(r.get(f"klein:{self.namespace}:job:{job_id}") or "{}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("job-replicas")
    config = config_with(work, job_visibility_timeout_s=VISIBILITY_S, job_concurrency=8)
    redis = RedisServer().start()
    fleet = EmulatorFleet.start_in_thread(["fal"])
    namespace = f"jobs-{uuid.uuid4().hex[:8]}"
    replicas: list[Replica] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KLEIN_", "FAL_", "REPLICATE_", "RUNFLOW_", "EMPIRIOLABS_", "REDIS_"))}
        env.update(fleet.env())
        env.update({"REDIS_URL": redis.url, "KLEIN_STATE_NAMESPACE": namespace, "KLEIN_CONFIG": str(config), "KLEIN_PRICING": str(PRICING), "PYTHONUNBUFFERED": "1"})
        replicas = [start_replica(name, env, work) for name in ("A", "B", "C")]
        for replica in replicas:
            wait_ready(replica)
        yield Rig(fleet, redis, namespace, replicas)
    finally:
        for replica in replicas:
            replica.stop()
        fleet.stop_thread()
        redis.stop()


def test_twenty_racing_requests_with_one_key_on_two_replicas_pay_once(rig: Rig) -> None:
    a, b = rig.replicas[0], rig.replicas[1]
    rig.knobs({"job": {"queue_ms": 1500, "run_ms": 0}})
    before = rig.fal()["generations"]
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def call(replica: Replica) -> None:
        start.wait(timeout=10)
        resp = rig.http.post(f"{replica.url}/v1/images/generations", json=BODY, headers={"Idempotency-Key": "nightly-batch-0042"})
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=call, args=((a, b)[i % 2],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert len(answers) == 20
    originals = [r for r in answers if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    replays = [r for r in answers if r.status_code == 200 and r.headers.get("idempotent-replayed") == "true"]
    busy = [r for r in answers if r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_in_use"]
    assert (len(originals), len(replays) + len(busy)) == (1, 19), [r.status_code for r in answers]
    assert rig.fal()["generations"] == before + 1

    later = rig.http.post(f"{b.url}/v1/images/generations", json=BODY, headers={"Idempotency-Key": "nightly-batch-0042"})
    assert later.headers["idempotent-replayed"] == "true" and later.content == originals[0].content
    for r in replays:
        assert r.content == originals[0].content
    assert rig.fal()["generations"] == before + 1


def test_a_replica_killed_mid_run_leaves_every_job_succeeded_and_paid_for_once(rig: Rig) -> None:
    victim, *survivors = rig.replicas
    rig.knobs({"job": {"queue_ms": 2500, "run_ms": 500}})
    before = rig.fal()["generations"]
    ids = []
    for i in range(JOBS):
        resp = rig.http.post(f"{rig.replicas[i % 3].url}/v1/images/generations", json={**BODY, "prompt": f"frame {i}"}, headers={"Prefer": "respond-async"})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])

    # Kill the victim while it holds jobs whose provider work is under way.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and rig.fal()["generations"] - before < 20:
        time.sleep(0.05)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)

    finished: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(finished) < JOBS:
        for job_id in ids:
            if job_id not in finished:
                job = rig.http.get(f"{survivors[len(finished) % 2].url}/v1/images/jobs/{job_id}").json()
                if job.get("status") in TERMINAL:
                    finished[job_id] = job
        time.sleep(0.2)

    assert sorted(j["status"] for j in finished.values()) == ["succeeded"] * JOBS, {k: v.get("error") for k, v in finished.items() if v["status"] != "succeeded"}
    stats = rig.fal()
    assert stats["generations"] - before == JOBS
    assert all(len(j["result"]["data"]) == 1 for j in finished.values())
    assert len({j["cost_usd"] for j in finished.values()}) == 1 and None not in {j["cost_usd"] for j in finished.values()}  # resumed jobs cost what the others did
    taken_over = [job_id for job_id in ids if rig.record(job_id).get("runs", 0) > 1]
    assert taken_over, "the kill interrupted no job; the test proved nothing"
    resumed = [job_id for job_id in taken_over if rig.record(job_id)["provider_jobs"]]
    assert resumed, "no interrupted job had provider work in flight"


def seed_job(rig: Rig, provider_jobs: dict[str, list[str]]) -> str:
    """Write a running job into Redis as a replica that died mid-run leaves it, and queue it."""
    job = ImageJob(kind=JobKind.GENERATE, prompt="left behind", width=512, height=512, deadline_s=120)
    record = JobRecord(id=new_job_id(), owner=None, route="generations", job=job_to_dict(job), base_url="http://127.0.0.1", created=time.time(), status="running", runs=1, provider_jobs=provider_jobs)

    async def write() -> None:
        client = aioredis.from_url(rig.redis.url, decode_responses=True)
        try:
            await RedisJobStore(client, namespace=rig.namespace, retention_s=3600).create(record)
            await RedisJobQueue(client, namespace=rig.namespace).enqueue(record.id)
        finally:
            await client.aclose()

    asyncio.run(write())
    return record.id


def test_a_taken_over_job_follows_the_provider_job_it_finds_instead_of_paying_again(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 800, "run_ms": 0}})
    fal = rig.fleet["fal"]
    submitted = rig.http.post(
        f"{fal.base_url}/fal-ai/flux-2/klein/4b",
        headers={"Authorization": f"Key {fal.key}"},
        json={"prompt": "left behind", "image_size": {"width": 512, "height": 512}, "num_images": 1, "output_format": "png"},
    )
    assert submitted.status_code == 200, submitted.text
    paid = rig.fal()["generations"]
    job_id = seed_job(rig, {"fal": [submitted.json()["request_id"]]})
    job = wait_job(rig.http, rig.replicas[1].url, job_id, timeout=20)
    assert job["status"] == "succeeded" and job["backend"] == "fal" and job["cost_usd"] is not None
    assert rig.fal()["generations"] == paid


def test_a_taken_over_job_whose_provider_job_is_gone_runs_afresh_once(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 0, "run_ms": 0}})
    paid = rig.fal()["generations"]
    job_id = seed_job(rig, {"replicate": ["gone-0001"], "fal": ["no-such-request"]})
    job = wait_job(rig.http, rig.replicas[1].url, job_id, timeout=20)
    assert job["status"] == "succeeded", job
    assert rig.fal()["generations"] == paid + 1
    left = rig.record(job_id)["provider_jobs"]
    assert list(left) == ["fal"] and left["fal"] != ["no-such-request"] and len(left["fal"]) == 1


def _replica_of(consumer: str, replicas: list[Replica]) -> Replica | None:
    """The replica whose process (or its one uvicorn worker) is the queue consumer `consumer` (host-pid-random)."""
    pid = int(consumer.rsplit("-", 2)[1])
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        parent = -1
    return next((r for r in replicas if r.proc.pid in (pid, parent)), None)


def test_a_job_watched_through_another_replica_streams_every_change_to_its_terminal_object(rig: Rig) -> None:
    live = [r for r in rig.replicas if r.proc.poll() is None]  # an earlier test kills one
    assert len(live) >= 2
    a, watchers_at = live[0], live[-2:]
    rig.knobs({"job": {"queue_ms": 800, "run_ms": 300}})
    ids = []
    for i in range(4):
        resp = rig.http.post(f"{a.url}/v1/images/generations", json={**BODY, "prompt": f"watched {i}"}, headers={"Prefer": "respond-async"})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])

    # Each job is watched through two replicas: whichever runs it, one watcher is on another.
    streams: dict[tuple[str, str], list[dict[str, Any]]] = {}
    ran_by: dict[str, str] = {}  # job id -> the queue consumer that held it
    done = threading.Event()

    def watch(replica: Replica, job_id: str) -> None:
        status, got = read_events(httpx.Client(timeout=60), f"{replica.url}/v1/images/jobs/{job_id}/events", timeout=60)
        assert status == 200
        streams[(replica.name, job_id)] = got

    def who_runs() -> None:
        stream = f"klein:{rig.namespace}:jobs:queue"
        with redis_client.Redis.from_url(rig.redis.url, decode_responses=True) as r:
            while not done.is_set():
                for entry in r.xpending_range(stream, "workers", min="-", max="+", count=100):
                    for _, fields in r.xrange(stream, min=entry["message_id"], max=entry["message_id"]):
                        ran_by.setdefault(fields["job"], entry["consumer"])
                time.sleep(0.05)

    threads = [threading.Thread(target=watch, args=(replica, job_id)) for job_id in ids for replica in watchers_at]
    spy = threading.Thread(target=who_runs)
    spy.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    spy.join(timeout=5)

    assert len(streams) == len(ids) * 2 and sorted(ran_by) == sorted(ids), ran_by
    crossed = []
    for job_id in ids:
        runner = _replica_of(ran_by[job_id], rig.replicas)
        assert runner is not None, ran_by[job_id]
        for replica in watchers_at:
            events = [e for e in streams[(replica.name, job_id)] if "data" in e]
            versions = [int(e["id"]) for e in events]
            assert versions == sorted(set(versions)), versions
            assert [e["event"] for e in events] == [e["data"]["status"] for e in events]
            assert events[-1]["event"] == "succeeded"
            assert events[-1]["data"] == rig.http.get(f"{a.url}/v1/images/jobs/{job_id}").json() == rig.http.get(f"{replica.url}/v1/images/jobs/{job_id}").json()
            if replica is not runner:
                crossed.append((replica, job_id, events))
    assert len(crossed) >= len(ids)  # every job was watched, to its end, through a replica that did not run it
    replica, job_id, events = max(crossed, key=lambda c: len(c[2]))
    assert len(events) >= 2 and events[0]["event"] in ("queued", "running"), [(e["id"], e["event"]) for e in events]
    # Resuming from a middle event, on another replica: exactly the later ones; from the terminal one: 204.
    elsewhere = next(r for r in live if r is not replica)
    status, again = read_events(rig.http, f"{elsewhere.url}/v1/images/jobs/{job_id}/events", headers={"Last-Event-ID": events[-2]["id"]})
    assert status == 200 and [e for e in again if "data" in e] == events[-1:]
    status, whole = read_events(rig.http, f"{a.url}/v1/images/jobs/{job_id}/events", headers={"Last-Event-ID": "1"})  # 1: its creation
    assert status == 200 and whole[0]["event"] == "running" and whole[-1] == events[-1]
    status, _ = read_events(rig.http, f"{a.url}/v1/images/jobs/{job_id}/events", headers={"Last-Event-ID": events[-1]["id"]})
    assert status == 204


def test_with_redis_down_an_async_request_is_a_retryable_503_and_sync_requests_still_work(rig: Rig) -> None:
    replica = rig.replicas[1]
    rig.knobs({"job": {"queue_ms": 0, "run_ms": 0}})
    rig.redis.stop()
    try:
        resp = rig.http.post(f"{replica.url}/v1/images/generations", json=BODY, headers={"Prefer": "respond-async"})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "job_store_unavailable" and resp.headers["x-should-retry"] == "true"
        assert rig.http.get(f"{replica.url}/v1/images/jobs/imgjob_000000000000").status_code == 503
        assert rig.http.post(f"{replica.url}/v1/images/generations", json=BODY).status_code == 200
    finally:
        rig.redis.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        resp = rig.http.post(f"{replica.url}/v1/images/generations", json=BODY, headers={"Prefer": "respond-async"})
        if resp.status_code == 202:
            break
        time.sleep(0.2)
    assert resp.status_code == 202
    job = wait_job(rig.http, replica.url, resp.json()["id"], timeout=20)  # the queue works again after Redis lost everything
    assert job["status"] == "succeeded", job
