"""What async jobs and idempotency keys cost, next to a plain synchronous request.

    python bench/jobs.py             # about a minute
    python bench/jobs.py --requests 100 --jobs 100

Everything on 127.0.0.1: the fal emulator (answering at once, so the figures
are the gateway's own work), one `python -m gateway.cli serve` process, and
for the Redis column one `redis-server` this script starts and stops by its
pid. For jobs in memory and in Redis, side by side:

- sync: a plain `POST /v1/images/generations` (200 with the image);
- accept: the same with `Prefer: respond-async` until its 202;
- to result: from that POST until a poller (every 10 ms) sees `succeeded`;
- replay: the same key and body again (`Idempotent-Replayed`), no provider call;
- drain: `--jobs` async jobs posted by 20 workers at once, until every one
  has ended; jobs per second.

Latencies are p50 / p99 in milliseconds over `--requests` sequential calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.emulators import EmulatorFleet  # noqa: E402 - after the repository is put on sys.path

BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def gateway(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            else:
                raise SystemExit("the gateway did not start")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def pct(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"{statistics.median(values) * 1000:7.1f} / {p99 * 1000:7.1f}"


async def timed(n: int, call: Callable[[int], Awaitable[None]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t0)
    return out


async def measure(url: str, requests: int, jobs: int) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await c.post("/v1/images/generations", json=BODY)  # warm up

        async def sync(_: int) -> None:
            assert (await c.post("/v1/images/generations", json=BODY)).status_code == 200

        async def accept(_: int) -> None:
            assert (await c.post("/v1/images/generations", json=BODY, headers={"Prefer": "respond-async"})).status_code == 202

        async def to_result(_: int) -> None:
            job = (await c.post("/v1/images/generations", json=BODY, headers={"Prefer": "respond-async"})).json()
            while (await c.get(f"/v1/images/jobs/{job['id']}")).json()["status"] not in ("succeeded", "failed"):
                await asyncio.sleep(0.01)

        run = uuid.uuid4().hex[:8]
        for i in range(requests):
            await c.post("/v1/images/generations", json=BODY, headers={"Idempotency-Key": f"{run}-{i}"})

        async def replay(i: int) -> None:
            resp = await c.post("/v1/images/generations", json=BODY, headers={"Idempotency-Key": f"{run}-{i}"})
            assert resp.headers.get("idempotent-replayed") == "true"

        figures = {
            "sync": pct(await timed(requests, sync)),
            "accept": pct(await timed(requests, accept)),
            "to result": pct(await timed(requests, to_result)),
            "replay": pct(await timed(requests, replay)),
        }

        gate = asyncio.Semaphore(20)
        ids: list[str] = []

        async def post(_: int) -> None:
            async with gate:
                ids.append((await c.post("/v1/images/generations", json=BODY, headers={"Prefer": "respond-async"})).json()["id"])

        t0 = time.perf_counter()
        await asyncio.gather(*(post(i) for i in range(jobs)))
        pending = set(ids)
        while pending:
            for job_id in list(pending):
                if (await c.get(f"/v1/images/jobs/{job_id}")).json()["status"] in ("succeeded", "failed"):
                    pending.discard(job_id)
            await asyncio.sleep(0.02)
        figures["drain"] = f"{jobs / (time.perf_counter() - t0):7.1f} jobs/s"
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=100)
    args = parser.parse_args()
    fleet = EmulatorFleet.start_in_thread(["fal"])
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KLEIN_", "FAL_", "REPLICATE_", "RUNFLOW_", "EMPIRIOLABS_", "REDIS_"))}
        base.update(fleet.env())
        base["PYTHONPATH"] = str(REPO)
        columns: dict[str, dict[str, str]] = {}
        with gateway(base) as url:
            columns["memory"] = asyncio.run(measure(url, args.requests, args.jobs))
        with redis_server() as redis_url, gateway({**base, "REDIS_URL": redis_url, "KLEIN_STATE_NAMESPACE": "bench"}) as url:
            columns["redis"] = asyncio.run(measure(url, args.requests, args.jobs))
    finally:
        fleet.stop_thread()
    print(f"{'ms p50 / p99':<12}{'memory':>20}{'redis':>20}")
    for row in columns["memory"]:
        print(f"{row:<12}{columns['memory'][row]:>20}{columns['redis'][row]:>20}")


if __name__ == "__main__":
    main()
