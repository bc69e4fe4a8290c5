"""The gateway as a fleet, on loopback with real processes.

Rolling restart: three `klein-gateway serve` replicas behind HAProxy (which
health-checks `/readyz`), sharing one real Redis (breaker state) and one image
store (a directory, its signing key kept in it; or a bucket on a loopback S3
server and a shared KLEIN_URL_SIGNING_KEY), with
the providers emulated by one emulator fleet in this process. Four clients
send a steady, bounded load while each replica in turn gets SIGTERM, exits,
is started again and rejoins. Then: no request failed, every url answer fetched
through HAProxy (so through any replica, restarted ones included) returns its
image, no breaker opened, and the cost headers the callers received add up to
`klein_cost_usd_total` over every replica's lifetimes.

How costs are summed across a restart: a restarted process starts its counters
at zero, and a scrape just before SIGTERM would miss what the drain finishes.
So each replica writes its metrics to its own PROMETHEUS_MULTIPROC_DIR; once a
process has exited, the test reads that directory's files (every sample the
process ever recorded, drain included) before the restart empties it.

`--workers 4`: url answers from a backend that returns bytes, fetched on fresh
connections (so any worker may answer): 100 of 100 succeed.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.emulators.launcher import EmulatorFleet
from tests.gateway_process import GatewayProcess, write_config
from tests.gateway_support import free_port
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REPLICAS = 3
CLIENTS = 4
MAX_REQUESTS_PER_CLIENT = 300  # the load's cap, whatever happens
LOAD_BUDGET_S = 150.0  # and its time limit
BODIES = [
    {"prompt": "a lighthouse", "size": "512x512", "response_format": "url"},
    {"prompt": "a harbour", "size": "512x512", "response_format": "url", "n": 2},
    {"prompt": "a ship", "size": "256x256", "response_format": "b64_json"},
    {"prompt": "a gull", "size": "512x512", "response_format": "url", "output_format": "webp"},
]


@dataclass
class Ledger:
    """What the callers saw."""

    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cost_usd: Decimal = Decimal(0)
    urls: list[tuple[str, str]] = field(default_factory=list)  # (url, expected media type)
    bad_fetches: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def haproxy_config(path: Path, port: int, servers: list[int]) -> Path:
    """Round robin over the replicas; a replica leaves rotation on its first failed /readyz.
    Requests a draining replica refuses (503 before any work) or a closed socket
    are retried on another replica."""
    lines = [
        "global",
        "  maxconn 512",
        "  log stderr format raw local0",
        "defaults",
        "  mode http",
        "  log global",
        "  option httplog",
        "  timeout connect 2s",
        "  timeout client 60s",
        "  timeout server 60s",
        "  retries 3",
        "  option redispatch 1",
        "  option http-buffer-request",
        "  retry-on conn-failure empty-response 503",
        "frontend klein",
        f"  bind 127.0.0.1:{port}",
        "  default_backend gateways",
        "backend gateways",
        "  balance roundrobin",
        "  option httpchk GET /readyz",
        "  http-check expect status 200",
        "  default-server inter 200ms fall 1 rise 2",
        *[f"  server g{i} 127.0.0.1:{p} check" for i, p in enumerate(servers)],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def emulators() -> Iterator[EmulatorFleet]:
    fleet = EmulatorFleet.start_in_thread()
    try:
        yield fleet
    finally:
        fleet.stop_thread()


def counter_total(metrics_dir: Path, name: str) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return sum(s.value for m in registry.collect() if m.name == name for s in m.samples if s.name == name + "_total")


def send(client: httpx.Client, lb: str, body: dict[str, object], ledger: Ledger) -> None:
    try:
        resp = client.post(f"{lb}/v1/images/generations", json=body, timeout=30)
    except httpx.HTTPError as exc:
        with ledger.lock:
            ledger.errors.append(f"{type(exc).__name__}: {exc}")
        return
    with ledger.lock:
        ledger.statuses.append(resp.status_code)
        if resp.status_code != 200:
            ledger.errors.append(f"{resp.status_code} {resp.text[:200]}")
            return
        ledger.cost_usd += Decimal(resp.headers["x-klein-cost-usd"])
        media = f"image/{body.get('output_format', 'png')}"
        ledger.urls.extend((d["url"], media) for d in resp.json()["data"] if "url" in d)


def fetch_ok(client: httpx.Client, url: str, media: str) -> bool:
    try:
        resp = client.get(url, timeout=15)
    except httpx.HTTPError:
        return False
    if resp.status_code != 200 or resp.headers.get("content-type") != media:
        return False
    with Image.open(io.BytesIO(resp.content)) as im:
        im.load()
    return True


def lb_url(url: str, lb: str) -> str:
    """The same path and signature, asked of the load balancer."""
    return lb + "/" + url.split("://", 1)[1].split("/", 1)[1]


@pytest.mark.parametrize("store", ["filesystem", "s3"])
def test_a_rolling_restart_behind_haproxy_loses_nothing(tmp_path: Path, emulators: EmulatorFleet, redis_server: RedisServer, store: str, request: pytest.FixtureRequest) -> None:
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy; .ci/run installs it)")
    emulators.reset()
    emulators["local"].set_knobs({"latency": {"ms": 120}})  # work is in flight when each SIGTERM lands
    if store == "s3":  # one bucket on the loopback S3 server, one signing key for every replica
        store_env = request.getfixturevalue("s3_bucket").env(KLEIN_URL_SIGNING_KEY="fleet-" + "5" * 32)
    else:  # one directory; the signing key is the one kept in it
        store_env = {"KLEIN_IMAGE_STORE": "filesystem", "KLEIN_IMAGE_DIR": str(tmp_path / "images")}
    config = write_config(tmp_path / "providers.yaml", shutdown_grace_s=10)
    lb_port = free_port()
    lb = f"http://127.0.0.1:{lb_port}"
    replicas = []
    for i in range(REPLICAS):
        metrics_dir = tmp_path / f"metrics-{i}"
        metrics_dir.mkdir()
        env = {
            **emulators.env(),
            **store_env,
            "REDIS_URL": redis_server.url,
            "KLEIN_STATE_NAMESPACE": f"fleet-{os.getpid()}-{time.time_ns()}"[:40],
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        replicas.append(GatewayProcess(tmp_path, config, env, name=f"replica-{i}"))
    namespace = replicas[0].env["KLEIN_STATE_NAMESPACE"]
    for r in replicas:
        r.env["KLEIN_STATE_NAMESPACE"] = namespace  # one shared breaker state
    lifetimes_cost = 0.0
    served_per_lifetime: list[float] = []
    haproxy = None
    ledger = Ledger()
    stop = threading.Event()
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(lambda r: r.start(timeout=60), replicas))
        cfg = haproxy_config(tmp_path / "haproxy.cfg", lb_port, [r.port for r in replicas])
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=(tmp_path / "haproxy.log").open("wb"), start_new_session=True)
        assert wait_for(lambda: _ok(f"{lb}/readyz"), 15), (tmp_path / "haproxy.log").read_text()

        def client_loop(k: int) -> int:
            sent = 0
            with httpx.Client() as client:
                started = time.monotonic()
                while not stop.is_set() and sent < MAX_REQUESTS_PER_CLIENT and time.monotonic() - started < LOAD_BUDGET_S:
                    send(client, lb, BODIES[(k + sent) % len(BODIES)], ledger)
                    sent += 1
            return sent

        with ThreadPoolExecutor(CLIENTS) as load:
            clients = [load.submit(client_loop, k) for k in range(CLIENTS)]
            time.sleep(2.0)
            during_restart = 0
            for r in replicas:
                before = len(ledger.statuses)
                r.sigterm()
                rc = r.wait(timeout=40)
                assert rc == 0, r.logs()[-2000:]
                metrics_dir = Path(r.env["PROMETHEUS_MULTIPROC_DIR"])
                lifetimes_cost += counter_total(metrics_dir, "klein_cost_usd")
                served_per_lifetime.append(counter_total(metrics_dir, "klein_requests"))
                r.start(timeout=60)
                assert wait_for(lambda: _ok(f"{lb}/readyz"), 10)
                time.sleep(1.0)  # HAProxy's rise: two good checks, then traffic again
                during_restart += len(ledger.statuses) - before
            time.sleep(1.0)
            stop.set()
            sent = sum(c.result() for c in clients)
        with httpx.Client() as client:
            unreadable = [u for u, media in ledger.urls if not fetch_ok(client, lb_url(u, lb), media)]
            backends = client.get(f"{lb}/v1/backends", timeout=10).json()["data"]
        for r in replicas:
            r.sigterm()
            assert r.wait(timeout=40) == 0
            metrics_dir = Path(r.env["PROMETHEUS_MULTIPROC_DIR"])
            lifetimes_cost += counter_total(metrics_dir, "klein_cost_usd")
            served_per_lifetime.append(counter_total(metrics_dir, "klein_requests"))
    finally:
        stop.set()
        if haproxy is not None:
            os.kill(haproxy.pid, signal.SIGTERM)
            haproxy.wait(timeout=10)
        for r in replicas:
            r.kill()
    assert not ledger.errors, ledger.errors[:5]
    assert sent == len(ledger.statuses) and set(ledger.statuses) == {200}
    assert during_restart >= REPLICAS * 5, "the load should keep flowing while replicas restart"
    assert all(n > 0 for n in served_per_lifetime), f"every replica lifetime served traffic: {served_per_lifetime}"
    assert len(ledger.urls) > 50 and not unreadable, f"{len(unreadable)} of {len(ledger.urls)} url answers did not fetch"
    assert {b["name"]: b.get("state") for b in backends if b.get("enabled")} == {b["name"]: "closed" for b in backends if b.get("enabled")}
    assert math.isclose(lifetimes_cost, float(ledger.cost_usd), rel_tol=1e-9, abs_tol=1e-9), (lifetimes_cost, ledger.cost_usd)
    assert ledger.cost_usd > 0


def test_four_workers_serve_every_url_answer_whichever_worker_is_asked(tmp_path: Path, emulators: EmulatorFleet, redis_server: RedisServer) -> None:
    emulators.reset()
    shared = {"REDIS_URL": redis_server.url, "KLEIN_STATE_NAMESPACE": f"fleet-{os.getpid()}-{time.monotonic_ns()}"}  # workers share state, as served
    gw = GatewayProcess(tmp_path, write_config(tmp_path / "providers.yaml"), {**emulators.env(), **shared}, workers=4)
    gw.start(timeout=60)
    body = {"prompt": "a lighthouse", "size": "256x256", "response_format": "url", "model": "local/flux-2-klein-4b"}
    try:
        with ThreadPoolExecutor(4) as pool:
            urls = list(pool.map(lambda _: _generate_url(gw.url, body), range(100)))

            def fetch(url: str) -> bool:
                with httpx.Client() as fresh:  # a new connection: any worker may accept it
                    return fetch_ok(fresh, url, "image/png")

            fetched = list(pool.map(fetch, urls))
        gw.sigterm()
        assert gw.wait(timeout=30) == 0
    finally:
        gw.kill()
    assert sum(fetched) == 100, f"{100 - sum(fetched)} of 100 url fetches failed"


def _generate_url(base: str, body: dict[str, object]) -> str:
    resp = httpx.post(f"{base}/v1/images/generations", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"][0]["url"]


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
