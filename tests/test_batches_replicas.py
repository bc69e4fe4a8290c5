"""A batch outlives the replica driving it: every line is done once and paid once.

Three `python -m gateway.cli serve` processes share one `redis-server` and one
file directory; the fal emulator (slow queue) is the only backend, and its
paid-generation counter is the witness. The replica that made the batch (and
so drives it, and runs many of its lines) is SIGKILLed mid-batch, by its own
pid. Another replica takes the batch's lease over when it lapses, finds the
lines already released by their fixed job ids instead of releasing them
again, and the job workers follow the dead replica's running lines.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.emulators import EmulatorFleet
from tests.gateway_support import clean_env
from tests.jobs_support import PRICING, config_with
from tests.redis_server import RedisServer, redis_available
from tests.test_resilience_replicas import Replica, start_replica, wait_ready

LINES = 40
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")]


@dataclass
class Rig:
    fleet: EmulatorFleet
    replicas: list[Replica]
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def paid(self) -> int:
        return int(self.http.get(f"{self.fleet['fal'].base_url}/_admin/stats").json()["generations"])


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("batch-replicas")
    config = config_with(work, job_visibility_timeout_s=3.0, job_concurrency=8)
    redis = RedisServer().start()
    fleet = EmulatorFleet.start_in_thread(["fal"])
    replicas: list[Replica] = []
    try:
        env = clean_env(
            **fleet.env(),
            REDIS_URL=redis.url,
            KLEIN_STATE_NAMESPACE=f"batches-{uuid.uuid4().hex[:8]}",
            KLEIN_CONFIG=str(config),
            KLEIN_PRICING=str(PRICING),
            KLEIN_IMAGE_STORE="filesystem",
            KLEIN_IMAGE_DIR=str(work / "shared"),
            PYTHONUNBUFFERED="1",
        )
        replicas = [start_replica(name, env, work) for name in ("A", "B", "C")]
        for replica in replicas:
            wait_ready(replica)
        yield Rig(fleet, replicas)
    finally:
        for replica in replicas:
            replica.stop()
        fleet.stop_thread()
        redis.stop()


def test_a_replica_killed_mid_batch_leaves_every_line_done_once_and_paid_once(rig: Rig) -> None:
    victim, *survivors = rig.replicas
    assert rig.http.post(f"{rig.fleet['fal'].base_url}/_admin/knobs", json={"job": {"queue_ms": 800, "run_ms": 200}}).status_code == 200
    lines = b"".join(
        json.dumps({"custom_id": f"sku-{i:03d}", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": f"product shot {i}", "size": "512x512"}}).encode() + b"\n" for i in range(LINES)
    )
    uploaded = rig.http.post(f"{victim.url}/v1/files", files={"file": ("catalogue.jsonl", lines)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    before = rig.paid()
    made = rig.http.post(f"{victim.url}/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/images/generations", "completion_window": "1h"})
    assert made.status_code == 200, made.text
    batch_id = made.json()["id"]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and rig.paid() - before < 10:
        time.sleep(0.05)
    assert rig.paid() - before >= 10, victim.log_tail()
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    killed_at = rig.paid() - before
    assert killed_at < LINES, "the batch ended before the kill; the test proved nothing"

    batch: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        batch = rig.http.get(f"{survivors[0].url}/v1/batches/{batch_id}").json()
        if batch.get("status") in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.2)
    assert batch.get("status") == "completed", (batch, survivors[0].log_tail(), survivors[1].log_tail())
    assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
    out = [json.loads(line) for line in rig.http.get(f"{survivors[1].url}/v1/files/{batch['output_file_id']}/content").content.splitlines()]
    assert sorted(line["custom_id"] for line in out) == [f"sku-{i:03d}" for i in range(LINES)]  # each line once
    assert rig.paid() - before == LINES  # and paid once
    costs = [Decimal(line["response"]["headers"]["x-klein-cost-usd"]) for line in out]
    assert len(set(costs)) == 1 and sum(costs, Decimal(0)) == Decimal(batch["klein"]["spent_usd"])
    assert batch["error_file_id"] is None
