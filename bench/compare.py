"""Direct, LiteLLM and Klein side by side, in one run, against one upstream.

    python bench/compare.py                 # full run (about 10 minutes on 2 cores)
    python bench/compare.py --quick         # one repeat, shorter cells
    python bench/compare.py --help

One OpenAI-shaped upstream (`POST /v1/images/generations`, in its own process,
answering after a fixed delay with a precomputed body) serves three paths:

- direct: the load generator posts OpenAI's body straight to it;
- LiteLLM: `litellm --config` (the proxy, one worker) with the upstream as an
  `openai/` model; installed by this script into bench/.venv-litellm
  (`litellm[proxy]`), never into the project's environment;
- Klein: `klein-gateway serve` (one worker) with only EmpirioLabs enabled, its
  base URL pointed at the upstream, once with the memory store and once with
  `REDIS_URL` (a redis-server this script starts on 127.0.0.1).

Payloads: `url` (the upstream answers with a URL to a 1024x1024 PNG it also
serves) and `b64` (the same body with about 1.1 MB of base64 inline), at
concurrency 1, 10 and 50, each cell repeated and the medians reported. Then a
fresh process of each gets 4,000 requests at concurrency 2,000 against the
same upstream holding each answer 5 s, and its peak RSS (VmHWM) is read.

The load generator is bench/overhead.py's: one asyncio loop in this process,
speaking HTTP/1.1 on plain asyncio streams, one keep-alive connection per
worker, reading every body without parsing it (`hey` is not installed here).
With Redis, `INFO commandstats` before and after a cell gives the commands
per request, and the gateway's `klein_state_round_trips_total` the round
trips (a pipeline of several commands is one; the background refresh of the
health copy counts too). Prints one table and writes it as JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from overhead import (  # noqa: E402 - after bench/ is put on sys.path
    HOST,
    OVERHEAD,
    Child,
    Target,
    child_env,
    closed_loop,
    free_port,
    histogram_buckets,
    histogram_quantile,
    percentile,
    raise_open_file_limit,
    scrape,
    table,
)

LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_SPEC = "litellm[proxy]"
RESULTS = BENCH / "results"
MODEL = "flux-2-klein-4b"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
B64_TARGET_CHARS = 1_100_000
# LiteLLM forwards `response_format` only for its dall-e-2/3 configs (any other
# `openai/` model refuses it), so the upstream is declared as dall-e-2; the
# upstream ignores the model name.
LITELLM_UPSTREAM_MODEL = "openai/dall-e-2"
PATHS = ("direct", "litellm", "klein", "klein+redis", "klein-base", "klein-base+redis", "klein-granian")
REDIS_PATHS = ("klein+redis", "klein-base+redis")  # each with a redis-server of its own


# ---- the upstream (its own process) -------------------------------------------------------------


def make_png(b64_chars: int) -> bytes:
    """A 1024x1024 PNG whose base64 is about `b64_chars` long: noise rows, then flat."""
    from PIL import Image

    rng = random.Random(7)
    raw_wanted = b64_chars * 3 // 4
    rows = max(1, raw_wanted // (1024 * 3))
    im = Image.new("RGB", (1024, 1024), (40, 90, 160))
    im.paste(Image.frombytes("RGB", (1024, rows), rng.randbytes(1024 * rows * 3)), (0, 0))
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=1)
    return out.getvalue()


async def serve_upstream(port: int, delay_s: float, jitter_s: float = 0.0) -> None:
    """POST /v1/images/generations after `delay_s` (plus up to `jitter_s`, uniform); GET /files/out.png at once (Range honoured); GET /v1/models* free."""
    import base64
    import random

    png = make_png(B64_TARGET_CHARS)
    file_url = f"http://{HOST}:{port}/files/out.png"
    bodies = {
        "url": json.dumps({"created": 1, "data": [{"url": file_url}]}).encode(),
        "b64_json": json.dumps({"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]}).encode(),
    }

    def answer(status: str, body: bytes, media: str = "application/json") -> bytes:
        return f"HTTP/1.1 {status}\r\ncontent-type: {media}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body

    def ranged(data: bytes, spec: str | None) -> bytes:
        """The image, or the part a `Range: bytes=a-b` asks for (206), as an image host serves it."""
        first, _, last = (spec or "").removeprefix("bytes=").partition("-")
        if not spec or not spec.startswith("bytes=") or not first.isdigit() or int(first) >= len(data):
            return answer("200 OK", data, "image/png")
        start, end = int(first), min(int(last) if last.isdigit() else len(data) - 1, len(data) - 1)
        part = data[start : end + 1]
        return answer("206 Partial Content", part, f"image/png\r\ncontent-range: bytes {start}-{end}/{len(data)}")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "POST" and path.rstrip("/").endswith("/images/generations"):
                    wanted = "b64_json" if b'"b64_json"' in body else "url"
                    await asyncio.sleep(delay_s + (random.uniform(0.0, jitter_s) if jitter_s else 0.0))
                    writer.write(answer("200 OK", bodies[wanted]))
                elif method == "GET" and path == "/files/out.png":
                    writer.write(ranged(png, headers.get("range")))
                elif method == "GET" and path.startswith("/v1/models"):
                    writer.write(answer("200 OK", json.dumps({"id": MODEL, "object": "model"}).encode()))
                else:
                    writer.write(answer("404 Not Found", b'{"error": {"message": "not found", "type": "invalid_request_error", "code": "not_found"}}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, port, backlog=8192, limit=1 << 20)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


# ---- the three servers -------------------------------------------------------------------------


def wait_ready(child: Child, url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.25)
    child.stop()
    raise RuntimeError(f"{child.name} did not become ready; see {child.log_path}")


def start_upstream(workdir: Path, delay_ms: float, tag: str, jitter_ms: float = 0.0) -> tuple[Child, str]:
    port = free_port()
    child = Child(
        f"upstream-{tag}",
        [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(port), "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)],
        child_env(REPO),
        REPO,
        workdir / f"upstream-{tag}.log",
    )
    line = child.read_line(60)
    if line != f"ready {port}":
        child.stop()
        raise RuntimeError(f"unexpected upstream output {line!r}")
    return child, f"http://{HOST}:{port}"


def start_klein(source: Path, workdir: Path, upstream: str, tag: str, redis_url: str | None = None) -> tuple[Child, str]:
    port = free_port()
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(source / "providers.yaml"), "--host", HOST, "--port", str(port), "--workers", "1", "--log-level", "info"]
    extra = {"EMPIRIOLABS_API_KEY": "sk-empiriolabs-bench", "KLEIN_EMPIRIOLABS_BASE_URL": upstream}
    if redis_url:
        extra["REDIS_URL"] = redis_url
    child = Child(f"klein-{tag}", argv, child_env(source, extra), source, workdir / f"klein-{tag}.log")
    url = f"http://{HOST}:{port}"
    wait_ready(child, url + "/readyz")
    return child, url


def start_klein_granian(source: Path, workdir: Path, upstream: str, tag: str) -> tuple[Child, str]:
    """The same app under granian (Rust HTTP, one worker, uvloop) instead of uvicorn.

    granian is not a dependency: it must be importable (e.g. `pip install
    --target DIR granian` and DIR on PYTHONPATH)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--factory",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--loop",
        "uvloop",
        "--log-level",
        "warning",
        "gateway.app:app_from_env",
    ]
    extra = {"EMPIRIOLABS_API_KEY": "sk-empiriolabs-bench", "KLEIN_EMPIRIOLABS_BASE_URL": upstream, "KLEIN_CONFIG": str(source / "providers.yaml")}
    child = Child(f"klein-granian-{tag}", argv, child_env(source, extra), source, workdir / f"klein-granian-{tag}.log")
    url = f"http://{HOST}:{port}"
    wait_ready(child, url + "/readyz")
    return child, url


def ensure_litellm() -> Path:
    """bench/.venv-litellm with `litellm[proxy]`, made on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True)
    return exe


def litellm_version() -> str:
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def start_litellm(workdir: Path, upstream: str, tag: str) -> tuple[Child, str]:
    exe = ensure_litellm()
    config = workdir / f"litellm-{tag}.yaml"
    config.write_text(
        json.dumps(
            {"model_list": [{"model_name": MODEL, "litellm_params": {"model": LITELLM_UPSTREAM_MODEL, "api_base": upstream + "/v1", "api_key": "sk-bench"}}], "litellm_settings": {"telemetry": False}}
        )
    )
    port = free_port()
    env = child_env(REPO) | {
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }  # no caller keys, as Klein runs here
    env.pop("PYTHONPATH", None)
    child = Child(f"litellm-{tag}", [str(exe), "--config", str(config), "--host", HOST, "--port", str(port), "--num_workers", "1"], env, workdir, workdir / f"litellm-{tag}.log")
    url = f"http://{HOST}:{port}"
    wait_ready(child, url + "/health/liveliness", timeout_s=180)
    return child, url


# ---- Redis -------------------------------------------------------------------------------------


class Redis:
    """A redis-server on a free loopback port, no persistence; stopped by its pid."""

    def __init__(self, workdir: Path, tag: str = "redis") -> None:
        self.port = free_port()
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [exe, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        self.child = Child(tag, argv, dict(os.environ), workdir, workdir / f"{tag}.log")
        import redis

        self.client = redis.Redis(host=HOST, port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self.client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def commands(self) -> Counter[str]:
        """Calls per command so far (INFO commandstats), INFO itself excluded."""
        stats = self.client.info("commandstats")
        return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info"})


# ---- cells -------------------------------------------------------------------------------------


@dataclass
class CellResult:
    payload: str
    concurrency: int
    path: str
    runs: list[dict[str, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    redis_per_request: float | None = None
    redis_commands: dict[str, float] = field(default_factory=dict)
    trips_per_request: float | None = None
    trips: dict[str, float] = field(default_factory=dict)

    def median(self, key: str) -> float:
        values = [r[key] for r in self.runs if key in r and r[key] == r[key]]
        return statistics.median(values) if values else float("nan")


def body_for(path: str, payload: str) -> bytes:
    fmt = "b64_json" if payload == "b64" else "url"
    model = f"empiriolabs/{MODEL}" if path.startswith("klein") else MODEL
    body: dict[str, Any] = {"model": model, "prompt": PROMPT, "size": "1024x1024", "response_format": fmt}
    if path.startswith("klein"):
        body["output_format"] = "png"
    return json.dumps(body).encode()


def target_for(path: str, url: str, payload: str) -> Target:
    u = httpx.URL(url)
    return Target(path, u.host, int(u.port or 80), "/v1/images/generations", body_for(path, payload))


def check(target: Target, payload: str) -> None:
    """One request through the path answers 200 with the image the upstream made."""
    resp = httpx.post(target.url, content=target.body, headers={"content-type": "application/json"}, timeout=60)
    if resp.status_code != 200:
        raise RuntimeError(f"{target.name}: HTTP {resp.status_code}: {resp.text[:300]}")
    item = resp.json()["data"][0]
    if payload == "b64" and len(item.get("b64_json") or "") < B64_TARGET_CHARS * 0.9:
        raise RuntimeError(f"{target.name}: no base64 image in {str(item)[:200]}")
    if payload == "url" and not item.get("url"):
        raise RuntimeError(f"{target.name}: no url in {str(item)[:200]}")


def round_trips(text: str) -> Counter[str]:
    """klein_state_round_trips_total by op, from a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "klein_state_round_trips":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels.get("op", "")] += int(sample.value)
    return out


def measure(
    target: Target, concurrency: int, duration_s: float, max_requests: int, delay_s: float, gateway_url: str | None, redis: Redis | None, proc: Child | None
) -> tuple[dict[str, float], Counter[str], Counter[str] | None, Counter[str] | None, int]:
    first = scrape(gateway_url) if gateway_url else ""
    before = histogram_buckets(first, *OVERHEAD) if gateway_url else []
    trips_before = round_trips(first) if gateway_url and redis else None
    redis_before = redis.commands() if redis else None
    cpu0 = proc.cpu_seconds() if proc else 0.0
    latencies, errors, elapsed = asyncio.run(closed_loop(target, concurrency, duration_s, max_requests, stagger_s=delay_s))
    figures = {
        "req_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(sorted(latencies), 50) * 1000,
        "p99_ms": percentile(sorted(latencies), 99) * 1000,
        "ok": float(len(latencies)),
    }
    if proc:
        figures["cpu_ms_per_req"] = (proc.cpu_seconds() - cpu0) * 1000 / max(len(latencies), 1)
    trips_delta = None
    if gateway_url:
        last = scrape(gateway_url)
        after = histogram_buckets(last, *OVERHEAD)
        if trips_before is not None:
            trips_delta = round_trips(last) - trips_before
        figures["own_p50_ms"] = histogram_quantile(0.5, before, after) * 1000
        figures["own_p99_ms"] = histogram_quantile(0.99, before, after) * 1000
    redis_delta = (redis.commands() - redis_before) if redis and redis_before is not None else None
    # the warm-up requests (one per connection) also reached Redis
    return figures, errors, redis_delta, trips_delta, len(latencies) + concurrency


# ---- thousands in flight --------------------------------------------------------------------------


async def burst(target: Target, total: int, concurrency: int, timeout_s: float) -> tuple[list[float], Counter[str], float]:
    """`total` requests by `concurrency` workers, each on its own connection, no warm-up."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    left = total

    async def worker() -> None:
        nonlocal left
        connection = target.connection()
        try:
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(target.send(connection), timeout_s)
                except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    await connection.close()
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[f"HTTP {status}"] += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def run_burst(name: str, start: Any, total: int, concurrency: int) -> dict[str, Any]:
    child, url = start()
    try:
        target = target_for(name, url, "url")
        idle = child.memory_kb().get("VmRSS", 0) / 1024 if child else None
        latencies, errors, elapsed = asyncio.run(burst(target, total, concurrency, timeout_s=120))
        mem = child.memory_kb() if child else {}
        s = sorted(latencies)
        return {
            "path": name,
            "requests": total,
            "concurrency": concurrency,
            "ok": len(latencies),
            "errors": dict(errors),
            "p50_s": percentile(s, 50),
            "p99_s": percentile(s, 99),
            "max_s": s[-1] if s else float("nan"),
            "wall_s": elapsed,
            "rss_idle_mb": idle,
            "rss_peak_mb": mem.get("VmHWM", 0) / 1024 if child else None,
        }
    finally:
        if child:
            child.stop()


# ---- report ----------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def report(cells: list[CellResult], bursts: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"machine: {meta['machine']}", f"conditions: {meta['conditions']}", ""]
    rows = []
    direct = {(c.payload, c.concurrency): c for c in cells if c.path == "direct"}
    litellm = {(c.payload, c.concurrency): c for c in cells if c.path == "litellm"}
    for c in cells:
        d, lt = direct.get((c.payload, c.concurrency)), litellm.get((c.payload, c.concurrency))
        ratio = c.median("req_s") / d.median("req_s") if d and c.path != "direct" else None
        vs_litellm = c.median("req_s") / lt.median("req_s") if lt and c.path.startswith("klein") else None
        added = (c.median("p50_ms") - d.median("p50_ms"), c.median("p99_ms") - d.median("p99_ms")) if d and c.path != "direct" else None
        rows.append(
            [
                c.payload,
                str(c.concurrency),
                c.path,
                fmt(c.median("req_s")),
                fmt(c.median("p50_ms")),
                fmt(c.median("p99_ms")),
                f"+{added[0]:.1f} / +{added[1]:.1f}" if added else "",
                fmt(ratio, 2),
                fmt(vs_litellm, 2),
                f"{fmt(c.median('own_p50_ms'), 2)} / {fmt(c.median('own_p99_ms'), 2)}" if c.path.startswith("klein") else "",
                fmt(c.median("cpu_ms_per_req"), 2),
                fmt(c.redis_per_request),
                fmt(c.trips_per_request, 2),
                str(sum(c.errors.values())),
            ]
        )
    lines.append(
        table(
            [
                "payload",
                "conc",
                "path",
                "req/s",
                "p50 ms",
                "p99 ms",
                "added p50/p99 ms",
                "of direct",
                "of LiteLLM",
                "own overhead p50/p99 ms",
                "server CPU ms/req",
                "redis cmds/req",
                "redis trips/req",
                "errors",
            ],
            rows,
        )
    )
    lines.append("medians of the repeats; added = path minus direct; own overhead = klein_gateway_overhead_seconds; CPU = the server process's user+system time per answered request")
    if bursts:
        lines += ["", f"{bursts[0]['requests']} requests at concurrency {bursts[0]['concurrency']}, upstream holds each {meta['slow_s']:g} s, fresh process each"]
        brow = [
            [
                b["path"],
                str(b["ok"]),
                str(sum(b["errors"].values())),
                fmt(b["p50_s"], 2),
                fmt(b["p99_s"], 2),
                fmt(b["max_s"], 2),
                f"{b['rss_idle_mb']:.0f} / {b['rss_peak_mb']:.0f}" if b["rss_peak_mb"] is not None else "(no server)",
                fmt(b["wall_s"]),
            ]
            for b in bursts
        ]
        lines.append(table(["path", "ok", "errors", "p50 s", "p99 s", "max s", "RSS idle / peak MB", "wall s"], brow))
    redis_cells = [c for c in cells if c.redis_commands]
    if redis_cells:
        lines += [
            "",
            *(
                f"Redis commands per request ({path}, {c.payload} c={c.concurrency}): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(c.redis_commands.items(), key=lambda kv: -kv[1]))
                for path in REDIS_PATHS
                for c in [c for c in redis_cells if c.path == path][:1]
            ),
            "Redis round trips per request (klein_state_round_trips_total, where the gateway counts them): "
            + "; ".join(f"{c.path} {c.payload} c={c.concurrency}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(c.trips.items(), key=lambda kv: -kv[1])) for c in redis_cells if c.trips),
        ]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat, 3 s cells, a 1,000-request burst at c=500")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; medians are reported (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per cell (default 5)")
    p.add_argument("--max-requests", type=int, default=5000, help="cap per cell (default 5000)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="the upstream's fixed delay (default 50)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="adds a uniform random 0..J ms to each answer of the fast upstream (default 0: fixed delay)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--payloads", nargs="+", default=["url", "b64"], choices=["url", "b64"])
    p.add_argument(
        "--paths", nargs="+", default=None, choices=list(PATHS), help="default: all but klein-base and klein-base+redis (which --baseline adds) and klein-granian (granian must be importable)"
    )
    p.add_argument("--baseline", type=Path, default=None, help="another checkout of the gateway, measured in the same run as path klein-base (before/after)")
    p.add_argument("--burst", type=int, nargs=2, default=[4000, 2000], metavar=("REQUESTS", "CONCURRENCY"), help="the in-flight phase (default 4000 2000; 0 0 skips it)")
    p.add_argument("--slow-s", type=float, default=5.0, help="the upstream's delay in the in-flight phase (default 5)")
    p.add_argument("--source", type=Path, default=REPO, help="a checkout of the gateway to measure (default: this one)")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures (default bench/results/compare-<time>.json)")
    p.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    p.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.paths is None:
        args.paths = [p for p in PATHS if (not p.startswith("klein-base") or args.baseline) and p != "klein-granian"]
    if any(p.startswith("klein-base") for p in args.paths) and not args.baseline:
        p.error("paths klein-base and klein-base+redis need --baseline DIR")
    if args.quick:
        args.repeat, args.duration, args.burst = 1, 3.0, [1000, 500]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_upstream(args.serve_upstream, args.delay_ms / 1000, args.jitter_ms / 1000))
        return 0
    raise_open_file_limit(65536)
    source = args.source.resolve()
    workdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="klein-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    if "litellm" in args.paths:
        ensure_litellm()  # before its version goes into the run's conditions
    meta = {
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}, Python {platform.python_version()}; load generator, server and upstream are separate processes sharing these CPUs",
        "conditions": f"upstream fixed delay {args.delay_ms:g} ms"
        + (f" plus 0-{args.jitter_ms:g} ms uniform" if args.jitter_ms else "")
        + f"; {args.repeat} repeats of {args.duration:g} s per cell (at most {args.max_requests} requests); one worker per server; LiteLLM {litellm_version() if 'litellm' in args.paths else '-'}",
        "slow_s": args.slow_s,
        "source": str(source),
        "baseline": str(args.baseline) if args.baseline else None,
        "git": subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cells: list[CellResult] = []
    bursts: list[dict[str, Any]] = []
    try:
        upstream, upstream_url = start_upstream(workdir, args.delay_ms, "fast", args.jitter_ms)
        children.append(upstream)
        servers: dict[str, tuple[Child | None, str]] = {"direct": (None, upstream_url)}
        redises: dict[str, Redis] = {}
        if "litellm" in args.paths:
            servers["litellm"] = start_litellm(workdir, upstream_url, "cells")
        if "klein" in args.paths:
            servers["klein"] = start_klein(source, workdir, upstream_url, "memory")
        if "klein-base" in args.paths:
            servers["klein-base"] = start_klein(args.baseline.resolve(), workdir, upstream_url, "base")
        if "klein-granian" in args.paths:
            servers["klein-granian"] = start_klein_granian(source, workdir, upstream_url, "cells")
        for path in [p for p in REDIS_PATHS if p in args.paths]:
            redises[path] = Redis(workdir, f"redis-{path.removesuffix('+redis')}")
            children.append(redises[path].child)
            checkout = source if path == "klein+redis" else args.baseline.resolve()
            servers[path] = start_klein(checkout, workdir, upstream_url, path.replace("+", "-"), redises[path].url)
        children += [c for c, _ in servers.values() if c]
        for payload in args.payloads:
            for path in args.paths:
                check(target_for(path, servers[path][1], payload), payload)
        for payload in args.payloads:
            for conc in args.concurrency:
                results = {path: CellResult(payload, conc, path) for path in args.paths}
                for _ in range(args.repeat):
                    for path in args.paths:  # interleaved, so drift on a shared machine hits every path alike
                        child, url = servers[path]
                        is_klein = path.startswith("klein")
                        figures, errors, redis_delta, trips_delta, sent = measure(
                            target_for(path, url, payload),
                            conc,
                            args.duration,
                            args.max_requests,
                            args.delay_ms / 1000,
                            url if is_klein else None,
                            redises.get(path),
                            None if path == "klein-granian" else child or upstream,  # granian serves from a child process: its CPU is not the pid's
                        )
                        cell = results[path]
                        cell.runs.append(figures)
                        for k, v in errors.items():
                            cell.errors[k] = cell.errors.get(k, 0) + v
                        if redis_delta is not None:
                            cell.redis_commands = {k: v / sent for k, v in redis_delta.items()}
                            cell.redis_per_request = sum(redis_delta.values()) / sent
                        if trips_delta:  # a gateway that counts its round trips (the baseline may not)
                            cell.trips = {k: v / sent for k, v in trips_delta.items()}
                            cell.trips_per_request = sum(trips_delta.values()) / sent
                        print(
                            f"  {payload:4} c={conc:<3} {path:12} {figures['req_s']:8.1f} req/s  p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms  errors {sum(errors.values())}",
                            flush=True,
                        )
                cells += results.values()
        for child in children:
            if child is not upstream:
                child.stop()
        children = [upstream]
        total, conc = args.burst
        if total:
            slow, slow_url = start_upstream(workdir, args.slow_s * 1000, "slow")
            children.append(slow)
            starters: dict[str, Any] = {
                "direct": lambda: (None, slow_url),
                "litellm": lambda: start_litellm(workdir, slow_url, "burst"),
                "klein": lambda: start_klein(source, workdir, slow_url, "burst"),
                "klein-base": lambda: start_klein(args.baseline.resolve(), workdir, slow_url, "burst-base"),
            }
            for path in [p for p in ("direct", "litellm", "klein", "klein-base") if p in args.paths]:
                bursts.append(run_burst(path, starters[path], total, conc))
                print(
                    f"  burst {path:8} ok {bursts[-1]['ok']} errors {sum(bursts[-1]['errors'].values())} p50 {bursts[-1]['p50_s']:.2f} s p99 {bursts[-1]['p99_s']:.2f} s peak RSS {fmt(bursts[-1]['rss_peak_mb'], 0)} MB",
                    flush=True,
                )
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                child.stop()
    text = report(cells, bursts, meta)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = args.json or RESULTS / f"compare-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(
        json.dumps(
            {"meta": meta, "cells": [asdict(c) | {"median": {k: c.median(k) for k in ("req_s", "p50_ms", "p99_ms", "own_p50_ms", "cpu_ms_per_req")}} for c in cells], "bursts": bursts, "table": text},
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
