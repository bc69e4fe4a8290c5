"""However a request ends, the gateway charges what the provider billed, everywhere.

One table: each row ends one request a different way (success, a provider
failure, the caller gone, the caller's deadline, the owner's cancel, a worker
that died mid-job; and the answered-as-a-stream success, failure, caller gone and deadline). Each runs against the Runflow emulator, which bills the
runs that succeed and nothing else (docs/providers/runflow.md#price), so the
provider's own count of paid work is its number of succeeded runs. After the
request has settled, that count times Runflow's price equals the ledger's
total, the key's budget spent and klein_cost_usd_total.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from gateway.domain.job import ImageJob, JobKind
from gateway.jobs.model import JobRecord, job_to_dict, new_job_id
from tests.emulators import EmulatorFleet
from tests.gateway_support import ENV, ServerThread, make_app, send_then_abandon, wait_until
from tests.test_abandoned_work import DAY_BUDGET, METRICS_TOKEN, budget_spent, keys_file, ledger_rows, metric_total

RUNFLOW_1MP = Decimal("0.01404858")  # $0.014 first MP + $0.001 per further MP, at 1024x1024
BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "url", "model": "runflow/flux-2-klein-4b"}
TEAM = {"authorization": "Bearer secret-team"}


@dataclass
class Rig:
    fleet: EmulatorFleet
    app: Litestar
    url: str

    def runflow(self, knobs: dict[str, Any]) -> None:
        assert httpx.post(f"{self.fleet['runflow'].base_url}/_admin/knobs", json=knobs, timeout=5).status_code == 200

    def provider_succeeded(self) -> int:
        return httpx.get(f"{self.fleet['runflow'].base_url}/_admin/stats", timeout=5).json()["jobs_succeeded"]

    @property
    def worker(self) -> Any:
        return self.app.state.gateway.jobs.on_cancel.__self__  # the app's JobWorker

    def settled(self) -> bool:
        """No request, follow-up or job run is left to settle."""
        return self.app.state.gateway.busy == 0 and not self.worker._running

    def on_server_loop(self, coro: Any) -> Any:
        """Run `coro` on the gateway's own event loop (its memory stores belong to it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.worker._tasks[0].get_loop()).result(timeout=10)


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread(["runflow"])
    yield fleet
    fleet.stop_thread()


@pytest.fixture
def rig(fleet: EmulatorFleet, tmp_path: Path) -> Iterator[Rig]:
    fleet.reset()
    env = {**ENV, **fleet.env(), "KLEIN_METRICS_TOKEN": METRICS_TOKEN, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, team={"budget_usd": {"day": str(DAY_BUDGET)}}))}
    app = make_app(env)
    with ServerThread(app) as server:
        yield Rig(fleet, app, server.url)


def ends_in_success(rig: Rig) -> None:
    assert httpx.post(f"{rig.url}/v1/images/generations", json=BODY, headers=TEAM, timeout=15).status_code == 200


def ends_in_a_provider_failure(rig: Rig) -> None:
    rig.runflow({"faults": {"queue": ["job_failed"]}})
    assert httpx.post(f"{rig.url}/v1/images/generations", json=BODY, headers=TEAM, timeout=15).status_code == 502


def ends_with_the_caller_gone(rig: Rig) -> None:
    rig.runflow({"job": {"run_ms": 2500}})
    send_then_abandon(rig.url, BODY, after_s=0.8, headers=TEAM)


def ends_at_the_callers_deadline(rig: Rig) -> None:
    rig.runflow({"job": {"run_ms": 5000}})  # Runflow's expected 3 s routes a 3.5 s deadline there; the run outlasts it
    answer = httpx.post(f"{rig.url}/v1/images/generations", json=BODY, headers={**TEAM, "x-klein-deadline-ms": "3500"}, timeout=15)
    assert answer.status_code == 504


def ends_by_the_owners_cancel(rig: Rig) -> None:
    rig.runflow({"job": {"run_ms": 2500}})
    job = httpx.post(f"{rig.url}/v1/images/generations", json=BODY, headers={**TEAM, "prefer": "respond-async"}, timeout=10).json()
    assert wait_until(lambda: httpx.get(f"{rig.fleet['runflow'].base_url}/_admin/stats", timeout=5).json()["paid_calls"] == 1, timeout=5)
    assert httpx.post(f"{rig.url}/v1/images/jobs/{job['id']}/cancel", headers=TEAM, timeout=10).status_code == 200


def ends_after_its_worker_died(rig: Rig) -> None:
    """A job a dead worker left running, its Runflow run submitted: the next worker follows that run."""
    rig.runflow({"job": {"run_ms": 1000}})
    runflow = rig.fleet["runflow"]
    submitted = httpx.post(
        f"{runflow.base_url}/v1/models/black-forest-labs/flux-2-klein-4b/runs",
        headers={"Authorization": f"Bearer {runflow.key}"},
        json={"input": {"prompt": "left behind", "image_size": {"width": 1024, "height": 1024}}},
        timeout=5,
    )
    assert submitted.status_code == 201, submitted.text
    job = ImageJob(kind=JobKind.GENERATE, prompt="left behind", width=1024, height=1024, deadline_s=120)
    record = JobRecord(
        id=new_job_id(), owner="team", route="generations", job=job_to_dict(job), base_url=rig.url, created=time.time(), status="running", runs=1, provider_jobs={"runflow": [submitted.json()["id"]]}
    )
    jobs = rig.app.state.gateway.jobs

    async def left_behind() -> None:
        await jobs.store.create(record)
        await jobs.queue.enqueue(record.id)

    rig.on_server_loop(left_behind())
    assert wait_until(lambda: any(r.route == "generations_async" for r in ledger_rows(rig.app)), timeout=10)


STREAMED = {**{k: v for k, v in BODY.items() if k != "response_format"}, "stream": True}  # a stream answers b64_json


def streamed_last_event(rig: Rig, headers: dict[str, str] | None = None) -> str:
    """The name of the stream's last event (comments skipped)."""
    with httpx.stream("POST", f"{rig.url}/v1/images/generations", json=STREAMED, headers={**TEAM, **(headers or {})}, timeout=15) as answer:
        assert answer.status_code == 200
        names = [line.removeprefix("event:").strip() for line in answer.iter_lines() if line.startswith("event:")]
    return names[-1]


def ends_in_a_streamed_success(rig: Rig) -> None:
    assert streamed_last_event(rig) == "image_generation.completed"


def ends_in_a_streamed_provider_failure(rig: Rig) -> None:
    rig.runflow({"faults": {"queue": ["job_failed"]}})
    assert streamed_last_event(rig) == "error"


def ends_with_the_streams_caller_gone(rig: Rig) -> None:
    rig.runflow({"job": {"run_ms": 2500}})
    with httpx.stream("POST", f"{rig.url}/v1/images/generations", json=STREAMED, headers=TEAM, timeout=15) as answer:
        assert answer.status_code == 200
        time.sleep(0.8)  # the run has started; the caller hangs up


def ends_at_the_streams_deadline(rig: Rig) -> None:
    rig.runflow({"job": {"run_ms": 5000}})
    assert streamed_last_event(rig, {"x-klein-deadline-ms": "3500"}) == "error"


ENDINGS: list[tuple[str, Callable[[Rig], None], int]] = [
    ("success", ends_in_success, 1),
    ("provider failure", ends_in_a_provider_failure, 0),
    ("caller gone", ends_with_the_caller_gone, 1),
    ("deadline", ends_at_the_callers_deadline, 1),
    ("cancel", ends_by_the_owners_cancel, 1),
    ("worker crash", ends_after_its_worker_died, 1),
    ("streamed success", ends_in_a_streamed_success, 1),
    ("streamed provider failure", ends_in_a_streamed_provider_failure, 0),
    ("streamed caller gone", ends_with_the_streams_caller_gone, 1),
    ("streamed deadline", ends_at_the_streams_deadline, 1),
]


@pytest.mark.parametrize(("ending", "end", "paid_runs"), ENDINGS, ids=[row[0] for row in ENDINGS])
def test_the_gateway_charges_what_the_provider_billed_however_the_request_ends(rig: Rig, ending: str, end: Callable[[Rig], None], paid_runs: int) -> None:
    end(rig)
    assert wait_until(lambda: rig.settled() and rig.provider_succeeded() == paid_runs, timeout=12), (ending, rig.provider_succeeded())
    time.sleep(0.2)  # nothing more arrives late
    provider_billed = RUNFLOW_1MP * rig.provider_succeeded()
    assert rig.provider_succeeded() == paid_runs
    charged = sum((row.estimated_usd for row in ledger_rows(rig.app)), Decimal(0))
    assert charged == provider_billed, (ending, [(r.route, r.status, r.estimated_usd) for r in ledger_rows(rig.app)])
    assert budget_spent(rig.app, "team") == provider_billed
    assert metric_total(rig.url, "klein_cost_usd_total") == provider_billed
