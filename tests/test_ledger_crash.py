"""SIGKILL after the answers loses no ledger row, with Redis and without.

A real `klein-gateway serve` process answers 30 requests against the
emulators and is then killed with SIGKILL (no shutdown, no final write):

- with Redis (the fleet mode), each settle put the budget change and the row
  in Redis in one step; a fresh process on the same Redis and database drains
  what the dead one had not written (it claims the rows the dead one was
  given), and the ledger holds exactly the 30 rows, adding up to what the
  budget in Redis says was spent;
- without Redis, every answered request's row was committed to the SQLite
  file before its answer went out.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from gateway.money.budgets import from_units
from gateway.money.keys import hash_key
from gateway.money.ledger import open_store
from tests.emulators import EmulatorFleet
from tests.gateway_support import wait_until
from tests.test_ledger_shutdown import BODY, serve

pytestmark = pytest.mark.slow

N = 30
SECRET = f"sk-klein-crash-{uuid.uuid4().hex}"


def base_env(fleet: EmulatorFleet, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLEIN_", "FAL_", "REPLICATE_", "RUNFLOW_", "EMPIRIOLABS_", "REDIS_", "DATABASE_"))}
    env.update(fleet.env())
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "team", "key_sha256": hash_key(SECRET), "budget_usd": {"day": "50"}}]}))
    env.update({"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "KLEIN_KEYS_FILE": str(keys), "KLEIN_METRICS_TOKEN": "crash-metrics-token"})
    return env


def answer_30(url: str) -> list[httpx.Response]:
    def one(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/images/generations", json=BODY, headers={"authorization": f"Bearer {SECRET}"}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(N)))
    assert [a.status_code for a in answers] == [200] * N, [a.text for a in answers if a.status_code != 200][:2]
    return answers


def kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # this gateway's own pid: no shutdown, no final write
    assert proc.wait(timeout=10) == -signal.SIGKILL


def ledger_rows(env: dict[str, str], tmp_path: Path) -> list:
    store = open_store(env.get("DATABASE_URL"), tmp_path / "usage.sqlite3")
    try:
        now = datetime.now(UTC)
        return store.fetch(now - timedelta(hours=1), now + timedelta(hours=1))
    finally:
        store.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_sigkill_after_the_answers_loses_no_row_with_redis(dialect, tmp_path, redis_server, request):
    fleet = EmulatorFleet.start_in_thread()
    env = base_env(fleet, tmp_path)
    namespace = f"crash-{uuid.uuid4().hex[:8]}"
    env.update({"REDIS_URL": redis_server.url, "KLEIN_STATE_NAMESPACE": namespace, "KLEIN_LEDGER_CLAIM_IDLE_S": "1"})
    if dialect == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_server").create_database(f"crash_{uuid.uuid4().hex[:8]}")
    procs = []
    try:
        proc, url, _ = serve(tmp_path, env)
        procs.append(proc)
        answers = answer_30(url)
        kill(proc)
        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        period = datetime.now(UTC).strftime("%Y-%m-%d")
        spent = from_units(int(r.get(f"klein:{namespace}:budget:{{team}}:day:{period}") or 0))
        assert spent == sum((Decimal(a.headers["x-klein-cost-usd"]) for a in answers), Decimal(0)) > 0

        # A fresh process on the same Redis and database writes what the dead one left in the stream.
        proc, url, _ = serve(tmp_path, env)
        procs.append(proc)
        assert wait_until(lambda: len(ledger_rows(env, tmp_path)) >= N and r.xlen(f"klein:{namespace}:ledger") == 0, timeout=30), (len(ledger_rows(env, tmp_path)), r.xlen(f"klein:{namespace}:ledger"))
        time.sleep(0.5)  # a row written twice would show up now
        rows = ledger_rows(env, tmp_path)
        assert sorted(row.request_id for row in rows) == sorted(a.headers["x-request-id"] for a in answers)
        assert sum((row.estimated_usd for row in rows), Decimal(0)) == spent
        usage = httpx.get(f"{url}/v1/usage", headers={"authorization": f"Bearer {SECRET}"}, timeout=10).json()
        assert usage["total"]["requests"] == N and Decimal(usage["total"]["cost_usd"]) == spent
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        fleet.stop_thread()


def test_sigkill_after_the_answers_loses_no_row_without_redis(tmp_path):
    fleet = EmulatorFleet.start_in_thread()
    env = base_env(fleet, tmp_path)
    proc = None
    try:
        proc, url, _ = serve(tmp_path, env)
        answers = answer_30(url)
        kill(proc)
        rows = ledger_rows(env, tmp_path)
        assert sorted(row.request_id for row in rows) == sorted(a.headers["x-request-id"] for a in answers)
        assert sum((row.estimated_usd for row in rows), Decimal(0)) == sum((Decimal(a.headers["x-klein-cost-usd"]) for a in answers), Decimal(0))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        fleet.stop_thread()
