"""What the gateway adds on top of a backend: latency, throughput, memory.

    python bench/overhead.py            # full run, about 4 minutes
    python bench/overhead.py --quick    # about 90 seconds

One run, side by side, on 127.0.0.1 only:

1. The local backend's emulator (`python -m tests.emulators --only local`)
   and the gateway (`python -m gateway.cli serve`, the production entry
   point: uvicorn, one worker, JSON request logs to a file) start as
   subprocesses. Only `local` is enabled (the gateway gets KLEIN_LOCAL_URL and
   no provider keys) and every request pins it with
   `model: "local/flux-2-klein-4b"`, so both paths end at the same emulator.
2. The same workload (one 1024x1024 PNG, b64_json) goes straight to the
   emulator (`POST /v1/images/generations` with the exact `GenerateRequest`
   body the local adapter sends) and through the gateway (the OpenAI body),
   at concurrency 1, 10 and 50, with the emulator's own image (about 70 KB of
   base64) and with images padded to about 1.5 MB of base64 (the
   `pad_to_bytes` knob), and with two upstreams:
   - saturated: the emulator answers at once, so a closed loop runs as fast
     as the CPUs allow; this measures throughput (req/s);
   - paced: the emulator holds each response `--paced-ms` (default 250 ms,
     a fast GPU) and the workers are staggered across that period, so
     nothing saturates at low concurrency; this measures the latency the
     gateway adds (gateway percentile minus direct percentile), the figure
     the 2 ms / 10 ms targets are about.
   Each cell is a closed loop bounded by time and count; direct and gateway
   cells alternate so drift hits both alike. The gateway's own
   `klein_gateway_overhead_seconds` histogram is read before and after each
   gateway cell (quantiles interpolated within buckets, as Prometheus'
   histogram_quantile does).
3. A fresh gateway process (so its peak RSS, /proc/<pid>/status VmHWM,
   belongs to this phase alone) takes thousands of concurrent requests
   (default 5,000, each on its own connection) against an emulator that holds
   each for `--slow` seconds (`job.run_ms`, default 20 s). They start evenly
   over `--ramp` seconds (default 16 s, about 300 a second: one worker on two
   shared cores absorbs that; a faster ramp measures how the gateway sheds
   overload, not how many requests it can hold). Reported: errors, latency,
   peak in flight (from the client's timeline and the gateway's
   `klein_in_flight_requests` gauge, scraped every second) and peak RSS.

Fairness: three processes (load generator, gateway, emulator), so the load
generator never shares the gateway's event loop or GIL, and the direct path
pays the same client and emulator costs as the gateway path. The load
generator is one asyncio loop speaking HTTP/1.1 over plain asyncio streams,
one keep-alive connection per worker: with httpx the client's own pool
bookkeeping took a whole core at 50 workers and set the direct figure. On a
2-core machine the three processes share the cores, and the gateway path
runs two servers' worth of Python where the direct path runs one, so
saturated throughput ratios are a lower bound for a gateway with its own
cores. The CPU column shows each process's share of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.domain.job import ImageJob, JobKind  # noqa: E402 - after the repository is put on sys.path
from gateway.providers import credential_env_names  # noqa: E402 - after the repository is put on sys.path
from gateway.providers.local import request_body  # noqa: E402 - after the repository is put on sys.path

HOST = "127.0.0.1"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SIZE = (1024, 1024)
PAYLOADS = {"small": 0, "1.5MB": 1_500_000 * 3 // 4}  # pad_to_bytes pads the raw image; base64 is 4/3 of it
PROVIDER_ENV = (*credential_env_names(), "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")  # every registered provider's key
OVERHEAD = ("klein_gateway_overhead_seconds", {"route": "generations"})

# Targets: docs/design.md#performance-targets, measured side by side.
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 10.0
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_INFLIGHT = 5000
TARGET_RSS_MB = 500.0


# ---- processes ---------------------------------------------------------------------


def raise_open_file_limit(wanted: int) -> int:
    """Soft RLIMIT_NOFILE up to `wanted` (capped by the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Child:
    """A subprocess this benchmark started; stopped by its pid only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], source: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - held for the child's life, closed in stop()
        self.proc = subprocess.Popen(argv, cwd=source, env=env, stdout=subprocess.PIPE, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_line(self, timeout: float) -> str:
        """One line of the child's stdout (the emulator prints its address there)."""
        stdout = self.proc.stdout
        assert stdout is not None
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"{self.name} printed nothing in {timeout:g}s; see {self.log_path}")
        return result[0].decode().strip()

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) from /proc/<pid>/status, in kB."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (/proc/<pid>/stat)."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def child_env(source: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without provider credentials or Klein settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV and not k.startswith("KLEIN_")}
    env["PYTHONPATH"] = str(source) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env | (extra or {})


def start_emulator(source: Path, workdir: Path) -> tuple[Child, str]:
    child = Child("emulator", [sys.executable, "-m", "tests.emulators", "--only", "local"], child_env(source), source, workdir / "emulator.log")
    line = child.read_line(30)
    name, _, value = line.removeprefix("export ").partition("=")
    if name != "KLEIN_LOCAL_URL":
        child.stop()
        raise RuntimeError(f"unexpected emulator output {line!r}")
    return child, value.strip("'\"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_gateway(source: Path, workdir: Path, local_url: str, tag: str) -> tuple[Child, str]:
    """`klein-gateway serve` with only the local backend enabled."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(source / "providers.yaml"), "--host", HOST, "--port", str(port), "--log-level", "info"]
    child = Child(f"gateway-{tag}", argv, child_env(source, {"KLEIN_LOCAL_URL": local_url}), source, workdir / f"gateway-{tag}.log")
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {child.proc.returncode}; see {child.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return child, url
        time.sleep(0.1)
    child.stop()
    raise RuntimeError(f"the gateway did not become ready; see {child.log_path}")


def set_knobs(local_url: str, patch: dict[str, Any]) -> None:
    httpx.post(local_url + "/_admin/knobs", json=patch, timeout=10).raise_for_status()


def upstream_latency(ms: float) -> dict[str, Any]:
    """The emulator's latency knob: a fixed delay before every response.

    Fixed, not random: the added latency is a difference of percentiles of
    two runs, and a spread upstream would bury a few milliseconds in sampling
    noise. The load generator staggers its workers across one upstream
    period instead, so a closed loop at concurrency 10 does not send ten
    requests at the same instant (that would be a burst test)."""
    return {"kind": "fixed", "ms": float(ms)}


# ---- the load generator ------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection: the load generator's whole client.

    Bodies are read to the last byte (Content-Length or chunked) and not
    parsed, so the client's cost per request is small and the same on both
    paths."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self.writer.wait_closed()
            self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            content = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            await self.reader.readuntil(b"\r\n")
            content = b"".join(parts)
        else:
            content = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, content


@dataclass(frozen=True)
class Target:
    """One path to the emulator: where to POST, and the body that asks for the image."""

    name: str
    host: str
    port: int
    path: str
    body: bytes

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def connection(self) -> Connection:
        return Connection(self.host, self.port)

    async def send(self, connection: Connection) -> tuple[int, bytes]:
        return await connection.post(self.path, self.body)

    def check(self) -> int:
        """One request: one image of the asked size comes back; returns its base64 length."""
        from PIL import Image

        response = httpx.post(self.url, content=self.body, headers={"content-type": "application/json"}, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {response.text[:300]}")
        payload = response.json()
        b64 = (payload["images"] if self.name == "direct" else payload["data"])[0]["b64_json"]
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            if im.size != SIZE:
                raise RuntimeError(f"{self.name}: got {im.size}, asked {SIZE}")
        return len(b64)


def targets(local_url: str, gateway_url: str) -> tuple[Target, Target]:
    width, height = SIZE
    job = ImageJob(kind=JobKind.GENERATE, prompt=PROMPT, width=width, height=height, output_format="png", response_format="b64_json")
    direct = json.dumps(request_body(job, timeout_s=60.0)).encode()  # what the local adapter sends
    via = json.dumps({"model": "local/flux-2-klein-4b", "prompt": PROMPT, "size": f"{width}x{height}", "response_format": "b64_json", "output_format": "png"}).encode()
    lu, gu = httpx.URL(local_url), httpx.URL(gateway_url)
    return (
        Target("direct", lu.host, int(lu.port or 80), "/v1/images/generations", direct),
        Target("gateway", gu.host, int(gu.port or 80), "/v1/images/generations", via),
    )


# ---- cells --------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100); NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class Cell:
    payload: str
    upstream_ms: float
    path: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    overhead_ms: dict[str, float] = field(default_factory=dict)  # from the gateway's histogram

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed_s if self.elapsed_s else 0.0

    def q_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies), q) * 1000


async def closed_loop(target: Target, concurrency: int, duration_s: float, max_requests: int, stagger_s: float = 0.0) -> tuple[list[float], Counter[str], float]:
    """`concurrency` workers, each on its own keep-alive connection, each
    sending its next request when the last one is answered; worker i starts
    `stagger_s * i / concurrency` late."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    sent = 0
    connections = [target.connection() for _ in range(concurrency)]
    try:
        # connect and warm every connection first: set-up is not what is measured
        await asyncio.gather(*(target.send(c) for c in connections))
        stop_at = time.perf_counter() + duration_s

        async def worker(i: int, connection: Connection) -> None:
            nonlocal sent
            await asyncio.sleep(stagger_s * i / concurrency)
            while sent < max_requests and time.perf_counter() < stop_at:
                sent += 1
                t0 = time.perf_counter()
                try:
                    status, _ = await target.send(connection)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors[type(exc).__name__] += 1
                    await connection.close()
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[f"HTTP {status}"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
        return latencies, errors, time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in connections))


def scrape(gateway_url: str) -> str:
    return httpx.get(gateway_url + "/metrics", timeout=30).text


def histogram_buckets(text: str, name: str, labels: dict[str, str]) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of one labelled histogram in a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name == name + "_bucket" and all(sample.labels.get(k) == v for k, v in labels.items()):
                    out.append((float(sample.labels["le"]), sample.value))
    return sorted(out)


def gauge_value(text: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == name and family.samples:
            return sum(s.value for s in family.samples)
    return None


def histogram_quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over the increase between two scrapes."""
    prior = dict(before)
    buckets = [(le, count - prior.get(le, 0.0)) for le, count in after]
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_bound
            return lower_bound + (le - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = le, count
    return lower_bound


def run_cell(cell: Cell, target: Target, duration_s: float, max_requests: int, gateway_url: str, procs: dict[str, Child]) -> Cell:
    before = histogram_buckets(scrape(gateway_url), *OVERHEAD) if target.name == "gateway" else []
    cpu0 = {"client": time.process_time()} | {name: p.cpu_seconds() for name, p in procs.items()}
    cell.latencies, cell.errors, cell.elapsed_s = asyncio.run(closed_loop(target, cell.concurrency, duration_s, max_requests, stagger_s=cell.upstream_ms / 1000))
    cell.cpu_s = {"client": time.process_time() - cpu0["client"]} | {name: p.cpu_seconds() - cpu0[name] for name, p in procs.items()}
    if target.name == "gateway":
        after = histogram_buckets(scrape(gateway_url), *OVERHEAD)
        cell.overhead_ms = {f"p{round(q * 100)}": histogram_quantile(q, before, after) * 1000 for q in (0.5, 0.99)}
    return cell


# ---- holding thousands in flight -------------------------------------------------------------


@dataclass
class InflightResult:
    requested: int
    slow_s: float
    ramp_s: float
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    client_peak_in_flight: int = 0
    gateway_peak_in_flight: float | None = None
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0
    elapsed_s: float = 0.0
    gateway_cpu_s: float = 0.0


class Sampler(threading.Thread):
    """Samples the gateway's RSS and its in-flight gauge, off the load generator's loop."""

    def __init__(self, gateway: Child, gateway_url: str) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.gateway_url = gateway_url
        self.stop_event = threading.Event()
        self.peak_rss_kb = 0
        self.peak_in_flight: float | None = None

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            next_scrape = 0.0
            while not self.stop_event.wait(0.1):
                self.peak_rss_kb = max(self.peak_rss_kb, self.gateway.memory_kb().get("VmRSS", 0))
                if time.monotonic() >= next_scrape:
                    next_scrape = time.monotonic() + 1.0
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        value = gauge_value(client.get(self.gateway_url + "/metrics").text, "klein_in_flight_requests")
                        if value is not None:
                            self.peak_in_flight = max(self.peak_in_flight or 0.0, value)


async def hold_in_flight(target: Target, count: int, ramp_s: float, timeout_s: float) -> tuple[list[tuple[float, float]], Counter[str], list[float]]:
    """`count` requests started evenly over `ramp_s`, each on a connection of its
    own (connecting is part of its latency, on both paths alike)."""
    errors: Counter[str] = Counter()
    spans: list[tuple[float, float]] = []
    latencies: list[float] = []
    origin = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(ramp_s * i / count)
        connection = target.connection()
        t0 = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(target.send(connection), max(0.1, timeout_s - (t0 - origin)))
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            return
        finally:
            await connection.close()
        t1 = time.perf_counter()
        spans.append((t0 - origin, t1 - origin))
        if status == 200:
            latencies.append(t1 - t0)
        else:
            errors[f"HTTP {status}"] += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return spans, errors, latencies


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    level = peak = 0
    for _, step in sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans]):
        level += step
        peak = max(peak, level)
    return peak


def run_inflight(source: Path, workdir: Path, local_url: str, count: int, slow_s: float, ramp_s: float, timeout_s: float) -> InflightResult:
    set_knobs(local_url, {"pad_to_bytes": 0, "job": {"run_ms": slow_s * 1000}})
    gateway, gateway_url = start_gateway(source, workdir, local_url, "inflight")
    result = InflightResult(count, slow_s, ramp_s)
    try:
        _, via = targets(local_url, gateway_url)
        via.check()
        result.rss_idle_mb = gateway.memory_kb().get("VmRSS", 0) / 1024
        sampler = Sampler(gateway, gateway_url)
        sampler.start()
        cpu0 = gateway.cpu_seconds()
        started = time.perf_counter()
        spans, result.errors, result.latencies = asyncio.run(hold_in_flight(via, count, ramp_s, timeout_s))
        result.elapsed_s = time.perf_counter() - started
        result.gateway_cpu_s = gateway.cpu_seconds() - cpu0
        sampler.stop_event.set()
        sampler.join(15)
        result.ok = len(result.latencies)
        result.client_peak_in_flight = peak_overlap(spans)
        result.gateway_peak_in_flight = sampler.peak_in_flight
        memory = gateway.memory_kb()
        result.rss_peak_mb = max(memory.get("VmHWM", 0), sampler.peak_rss_kb) / 1024
        result.rss_after_mb = memory.get("VmRSS", 0) / 1024
    finally:
        gateway.stop()
    return result


# ---- report -------------------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def cell_rows(cells: list[Cell]) -> list[list[str]]:
    by_key = {(c.payload, c.upstream_ms, c.path, c.concurrency): c for c in cells}
    rows = []
    for c in cells:
        direct = by_key.get((c.payload, c.upstream_ms, "direct", c.concurrency))
        added = ratio = own = ""
        if c.path == "gateway" and direct is not None:
            added = f"{c.q_ms(50) - direct.q_ms(50):+.1f} / {c.q_ms(99) - direct.q_ms(99):+.1f}"
            ratio = f"{c.rps / direct.rps:.2f}" if direct.rps else "-"
        if c.overhead_ms:
            own = f"{fmt(c.overhead_ms['p50'], 2)} / {fmt(c.overhead_ms['p99'], 2)}"
        cpu = " ".join(f"{v / c.elapsed_s * 100:.0f}" for v in c.cpu_s.values()) if c.elapsed_s else ""
        upstream = "saturated" if not c.upstream_ms else f"paced {c.upstream_ms:g} ms"
        rows.append(
            [
                f"{c.payload}, {upstream}",
                c.path,
                str(c.concurrency),
                str(len(c.latencies)),
                f"{c.rps:.0f}",
                fmt(c.q_ms(50)),
                fmt(c.q_ms(95)),
                fmt(c.q_ms(99)),
                added,
                own,
                ratio,
                str(sum(c.errors.values())),
                cpu,
            ]
        )
    return rows


def report(cells: list[Cell], inflight: InflightResult | None, args: argparse.Namespace, sizes: dict[str, int]) -> str:
    out = [
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Linux {platform.release()}, Python {platform.python_version()}; "
        "load generator, gateway and emulator are 3 processes sharing these CPUs",
        "workload: 1024x1024 PNG as b64_json; payloads "
        + ", ".join(f"{k} = {v / 1e6:.2f} MB of base64" for k, v in sizes.items())
        + f"; {args.duration:g} s per saturated cell, {2 * args.duration:g} s per paced cell (at most {args.max_requests} requests)",
        "",
    ]
    if cells:
        out.append(
            table(
                ["workload", "path", "conc", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms", "added p50/p99 ms", "own overhead p50/p99 ms", "gw/direct req/s", "errors", "CPU % client gw emu"],
                cell_rows(cells),
            )
        )
        out += [
            "",
            "added = gateway percentile minus direct percentile (same workload and concurrency); own overhead = the",
            "gateway's klein_gateway_overhead_seconds over the same cell (time outside the adapter call); CPU = share of one core.",
        ]
    if inflight is not None:
        lat = sorted(inflight.latencies)
        gauge = "-" if inflight.gateway_peak_in_flight is None else f"{inflight.gateway_peak_in_flight:.0f}"
        errors = str(sum(inflight.errors.values())) + (" " + ", ".join(f"{k} {v}" for k, v in inflight.errors.most_common()) if inflight.errors else "")
        out += [
            "",
            f"in flight: {inflight.requested} requests started over {inflight.ramp_s:g} s, upstream holds each {inflight.slow_s:g} s, client gives up after {args.inflight_timeout:g} s",
            table(
                ["requests", "ok", "errors", "peak in flight (client / gateway gauge)", "p50 s", "p99 s", "max s", "RSS idle / peak / after MB", "wall s", "gateway CPU s"],
                [
                    [
                        str(inflight.requested),
                        str(inflight.ok),
                        errors,
                        f"{inflight.client_peak_in_flight} / {gauge}",
                        fmt(percentile(lat, 50), 2),
                        fmt(percentile(lat, 99), 2),
                        fmt(percentile(lat, 100), 2),
                        f"{inflight.rss_idle_mb:.0f} / {inflight.rss_peak_mb:.0f} / {inflight.rss_after_mb:.0f}",
                        f"{inflight.elapsed_s:.1f}",
                        f"{inflight.gateway_cpu_s:.1f}",
                    ]
                ],
            ),
        ]
    out += ["", "targets:", *verdicts(cells, inflight, args)]
    return "\n".join(out)


def verdicts(cells: list[Cell], inflight: InflightResult | None, args: argparse.Namespace) -> list[str]:
    lines = []
    by_key = {(c.payload, c.upstream_ms, c.path, c.concurrency): c for c in cells}

    def mark(ok: bool) -> str:
        return "[ok]  " if ok else "[MISS]"

    for payload in dict.fromkeys(c.payload for c in cells):
        gw, direct = by_key.get((payload, args.paced_ms, "gateway", 10)), by_key.get((payload, args.paced_ms, "direct", 10))
        if gw and direct:
            p50, p99 = gw.q_ms(50) - direct.q_ms(50), gw.q_ms(99) - direct.q_ms(99)
            lines.append(f"  {mark(p50 < TARGET_ADDED_P50_MS)} {payload}, paced, concurrency 10: added p50 {p50:.1f} ms (target < {TARGET_ADDED_P50_MS:g})")
            lines.append(f"  {mark(p99 < TARGET_ADDED_P99_MS)} {payload}, paced, concurrency 10: added p99 {p99:.1f} ms (target < {TARGET_ADDED_P99_MS:g})")
        gw, direct = by_key.get((payload, 0.0, "gateway", 50)), by_key.get((payload, 0.0, "direct", 50))
        if gw and direct and direct.rps:
            ratio = gw.rps / direct.rps
            lines.append(
                f"  {mark(ratio >= TARGET_THROUGHPUT_RATIO)} {payload}, saturated, concurrency 50: {gw.rps:.0f} req/s through the gateway vs {direct.rps:.0f} direct = {ratio:.2f} (target >= {TARGET_THROUGHPUT_RATIO:g})"
            )
    if inflight is not None:
        clean = not inflight.errors and inflight.ok == inflight.requested and inflight.requested >= TARGET_INFLIGHT
        lines.append(f"  {mark(clean)} {inflight.requested} in flight: {inflight.ok} ok, {sum(inflight.errors.values())} errors (target {TARGET_INFLIGHT} with no errors)")
        lines.append(f"  {mark(inflight.rss_peak_mb < TARGET_RSS_MB)} gateway peak RSS {inflight.rss_peak_mb:.0f} MB (target < {TARGET_RSS_MB:g})")
    return lines


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short cells, about 90 s in all")
    p.add_argument("--duration", type=float, help="seconds per saturated cell; paced cells run twice as long (default 4, quick 0.5)")
    p.add_argument("--max-requests", type=int, default=20_000, help="at most this many requests per cell")
    p.add_argument("--concurrency", default="1,10,50", help="comma-separated (default 1,10,50)")
    p.add_argument("--payloads", default="small,1.5MB", help="small (the emulator's own image) and/or 1.5MB (padded)")
    p.add_argument("--paced-ms", type=float, default=250.0, help="upstream latency in the paced cells (default 250; 0 skips them)")
    p.add_argument("--no-saturated", action="store_true", help="skip the saturated cells")
    p.add_argument("--inflight", type=int, default=TARGET_INFLIGHT, help="concurrent requests in the in-flight run (0 skips it)")
    p.add_argument("--slow", type=float, default=20.0, help="seconds the upstream holds each request in the in-flight run (default 20, longer than the ramp so all overlap)")
    p.add_argument(
        "--ramp", type=float, default=16.0, help="seconds over which the in-flight requests start (default 16: about 300 new requests a second, well within what one worker absorbs on 2 shared cores)"
    )
    p.add_argument("--inflight-timeout", type=float, help="seconds the in-flight run may take in all (default ramp + slow + 45)")
    p.add_argument("--source", type=Path, default=REPO, help="run the gateway and emulator from this checkout, to compare a change (default: this one)")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--logs", type=Path, help="keep the gateway's and emulator's logs in this directory")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 0.5 if args.quick else 4.0
    if args.inflight_timeout is None:
        args.inflight_timeout = args.ramp + args.slow + 45.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.source.resolve()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    upstreams = ([] if args.no_saturated else [0.0]) + ([args.paced_ms] if args.paced_ms else [])
    chosen = [p.strip() for p in args.payloads.split(",") if p.strip()]
    limit = raise_open_file_limit(max(4096, args.inflight * 3 + 1024))
    if args.inflight and limit < args.inflight * 3:
        print(f"warning: open-file limit {limit} may be too low for {args.inflight} requests through the gateway", file=sys.stderr)
    t_start = time.monotonic()
    cells: list[Cell] = []
    sizes: dict[str, int] = {}
    inflight = None
    with tempfile.TemporaryDirectory(prefix="klein-bench-") as tmp:
        workdir = Path(tmp) if args.logs is None else args.logs
        workdir.mkdir(parents=True, exist_ok=True)
        emulator, local_url = start_emulator(source, workdir)
        try:
            gateway, gateway_url = start_gateway(source, workdir, local_url, "cells")
            procs = {"gateway": gateway, "emulator": emulator}
            try:
                # a GPU that keeps up: no queue in front of it
                set_knobs(local_url, {"local": {"max_concurrency": 100_000, "queue_capacity": 100_000}, "job": {"run_ms": 0}})
                direct, via = targets(local_url, gateway_url)
                for payload in chosen:
                    set_knobs(local_url, {"pad_to_bytes": PAYLOADS[payload]})
                    sizes[payload] = max(direct.check(), via.check())  # renders the image once; checks both paths
                    for upstream_ms in upstreams:
                        set_knobs(local_url, {"latency": upstream_latency(upstream_ms)})
                        for concurrency in concurrencies:
                            for target in (direct, via):
                                duration = args.duration * (2 if upstream_ms else 1)  # paced cells: fewer requests a second, so longer
                                cell = run_cell(Cell(payload, upstream_ms, target.name, concurrency), target, duration, args.max_requests, gateway_url, procs)
                                cells.append(cell)
                                print(
                                    f"  {payload:>5} upstream {upstream_ms:4g} ms {target.name:>7} c={concurrency:<3} {cell.rps:6.0f} req/s  p50 {cell.q_ms(50):7.1f} ms  p99 {cell.q_ms(99):7.1f} ms  errors {sum(cell.errors.values())}",
                                    file=sys.stderr,
                                    flush=True,
                                )
            finally:
                gateway.stop()
            if args.inflight:
                print(f"  in flight: {args.inflight} requests, upstream {args.slow:g} s ...", file=sys.stderr, flush=True)
                inflight = run_inflight(source, workdir, local_url, args.inflight, args.slow, args.ramp, args.inflight_timeout)
        finally:
            emulator.stop()
    print(report(cells, inflight, args, sizes))
    print(f"\n(run took {time.monotonic() - t_start:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cells": [
                        {
                            "payload": c.payload,
                            "upstream_ms": c.upstream_ms,
                            "path": c.path,
                            "concurrency": c.concurrency,
                            "ok": len(c.latencies),
                            "rps": c.rps,
                            "p50_ms": c.q_ms(50),
                            "p95_ms": c.q_ms(95),
                            "p99_ms": c.q_ms(99),
                            "errors": dict(c.errors),
                            "overhead_ms": c.overhead_ms,
                            "cpu_s": c.cpu_s,
                            "elapsed_s": c.elapsed_s,
                        }
                        for c in cells
                    ],
                    "inflight": None
                    if inflight is None
                    else {k: v for k, v in vars(inflight).items() if k != "latencies"} | {"p50_s": percentile(sorted(inflight.latencies), 50), "p99_s": percentile(sorted(inflight.latencies), 99)},
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
