"""A graceful shutdown under load loses no ledger row, on SQLite and on PostgreSQL.

A real `klein-gateway serve` process with slow emulated backends gets 40
concurrent requests; SIGTERM arrives while most are in flight. Every request
that got an answer has its row, and no row exists for a request that got
none. Then `klein-gateway usage` reads the same ledger back as a table.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.money.ledger import open_store
from tests.emulators import EmulatorFleet
from tests.gateway_support import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url"}

pytestmark = pytest.mark.slow


def serve(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    config = yaml.safe_load((REPO / "providers.yaml").read_text())
    config["gateway"]["usage_ledger"] = str(tmp_path / "usage.sqlite3")
    (tmp_path / "providers.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--workers",
                "1",
                "--config",
                str(tmp_path / "providers.yaml"),
                "--pricing",
                str(REPO / "pricing"),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(ready, 30), log_path.read_text()
    return proc, url, tmp_path / "providers.yaml"


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=2).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("klein_in_flight_requests "))


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_sigterm_under_load_loses_no_row(dialect, tmp_path, request):
    fleet = EmulatorFleet.start_in_thread()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLEIN_", "FAL_", "REPLICATE_", "RUNFLOW_", "EMPIRIOLABS_", "REDIS_", "DATABASE_"))}
    env.update(fleet.env())
    env["PYTHONPATH"] = str(REPO)
    if dialect == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_server").create_database(f"shutdown_{uuid.uuid4().hex[:8]}")
    proc = None
    try:
        for backend in fleet.emulators:
            httpx.post(f"{fleet[backend].base_url}/_admin/knobs", json={"job": {"run_ms": 1500}, "local": {"max_concurrency": 64}}).raise_for_status()
        proc, url, config = serve(tmp_path, env)

        def one(_: int) -> httpx.Response | None:
            try:
                return httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=30)
            except httpx.TransportError:
                return None  # refused once the server had stopped listening: no answer, no row

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(one, i) for i in range(40)]
            assert wait_until(lambda: in_flight(url) >= 20, timeout=10)  # now most wait on a backend
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        # uvicorn finishes what is in flight, runs the shutdown, then re-raises the signal.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in (tmp_path / "gateway.log").read_text()
        # What was in flight at SIGTERM is served; what arrives during the drain is refused
        # before any work (503 shutting_down, for a load balancer to retry elsewhere) and has no row.
        replied = [a for a in answers if a is not None]
        answered = [a for a in replied if a.status_code == 200]
        refused = [a for a in replied if a.status_code != 200]
        assert len(answered) >= 20  # the load really was in flight at SIGTERM
        assert all(a.status_code == 503 and a.json()["error"]["code"] == "shutting_down" for a in refused), [a.text for a in refused][:2]

        store = open_store(env.get("DATABASE_URL"), tmp_path / "usage.sqlite3")
        now = datetime.now(UTC)
        rows = store.fetch(now - timedelta(hours=1), now + timedelta(hours=1))
        store.close()
        assert sorted(r.request_id for r in rows) == sorted(a.headers["x-request-id"] for a in answered)
        assert sum((r.estimated_usd for r in rows), Decimal(0)) == sum((Decimal(a.headers["x-klein-cost-usd"]) for a in answered), Decimal(0))

        # The CLI prints the same totals from the same ledger.
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "usage", "--config", str(config), "--pricing", str(REPO / "pricing"), "--since", "1d", "--group-by", "key"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        total = next(line for line in out.stdout.splitlines() if line.startswith("total")).split()
        assert total[1] == str(len(answered))
        assert Decimal(total[4]) == sum((r.estimated_usd for r in rows), Decimal(0))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        fleet.stop_thread()
