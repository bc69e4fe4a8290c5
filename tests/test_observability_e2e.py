"""The observability story end to end: a real gateway, a real Prometheus.

One module-scoped run starts `python -m gateway.cli serve --emulate --workers 2`
as a subprocess (its own process group, stopped by its pid), starts Prometheus
on loopback with the shipped `klein-gateway` job and the shipped alert rules
pointed at it, and sends a short load in four phases, one scrape apart:

  healthy     generations of several sizes, n 1 to 4, b64 and url, an edit,
              and a request the gateway refuses (4xx);
  local 5xx   the local emulator answers 500 to every paid call (its admin
              knob), so requests fail over to the next cheapest backend, and
              two requests pinned to `local/...` end in 5xx;
  healed      the knob is cleared; the mix again;
  tail        a few more, so every rate window holds increases.

Then each test reads the same run: every dashboard panel and every alert rule
evaluated through Prometheus' HTTP API returns data, and the gateway's own
/metrics (both workers summed through PROMETHEUS_MULTIPROC_DIR) agrees with
what the callers received. Which worker served a request is read from the
per-process files in PROMETHEUS_MULTIPROC_DIR (prometheus_client names them
`<type>_<pid>.db`): the metrics themselves carry no pid label.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.metrics import GatewayMetrics
from tests.gateway_support import clean_env
from tests.prometheus_server import (
    JOB,
    REPO,
    PrometheusServer,
    alert_rules,
    dashboard_exprs,
    evaluable_parts,
    free_port,
    prometheus_binary,
    start_prometheus,
    substitute_grafana_variables,
)
from tests.redis_server import RedisServer

NO_PROMETHEUS = "prometheus is not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run installs it)"

WORKERS = 2
BUDGET_S = 60.0  # the whole run, start to stop
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 15.0
USD_QUANTUM = Decimal("0.00000001")  # x-klein-cost-usd has 8 decimal places (pricing.usd)


# ---- the load ------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request of the load: a generation (JSON) or an edit (multipart)."""

    size: str = "512x512"
    n: int = 1
    response_format: str = "b64_json"
    output_format: str | None = None
    edit: bool = False
    model: str = "flux-2-klein-4b"
    stream: bool = False  # stream: true with partial_images 1: previews from the (emulated) local GPU


@dataclass
class Answer:
    phase: str
    call: Call
    status: int
    backend: str | None
    cost_usd: Decimal | None  # None: the header was missing
    attempts: int | None
    images: int


MIX = [
    Call(),
    Call(size="1024x1024"),
    Call(size="768x1024", n=2, response_format="url"),
    Call(size="1024x768", output_format="jpeg"),
    Call(size="512x512", n=4),
    Call(size="1280x720", response_format="url", output_format="webp"),
    Call(edit=True),
    Call(size="1024x1024", n=3, response_format="url"),
    Call(size="640x640", n=2),
    Call(size="512x512", response_format="url"),
]
PINNED_TO_LOCAL = Call(model="local/flux-2-klein-4b")
REFUSED = Call(size="500x500")  # not a multiple of 16: a 400 before any backend
STREAMED = Call(stream=True)

PHASES: list[tuple[str, dict[str, Any] | None, list[Call]]] = [
    ("healthy", None, MIX + [REFUSED]),
    ("local_5xx", {"faults": {"server_error": 1.0}}, [PINNED_TO_LOCAL, PINNED_TO_LOCAL] + MIX),
    ("healed", {"faults": {"server_error": 0.0}}, MIX),
    ("tail", None, MIX[:6] + [REFUSED, STREAMED]),
]


def reference_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def send(client: httpx.Client, base: str, phase: str, call: Call, png: bytes) -> Answer:
    fields: dict[str, Any] = {"model": call.model, "prompt": "a lighthouse at dusk", "size": call.size, "n": call.n, "response_format": call.response_format}
    if call.output_format:
        fields["output_format"] = call.output_format
    if call.edit:
        form = {k: str(v) for k, v in fields.items()}
        response = client.post(f"{base}/v1/images/edits", data=form, files={"image": ("ref.png", png, "image/png")})
    elif call.stream:
        return send_streamed(client, base, phase, call, fields)
    else:
        response = client.post(f"{base}/v1/images/generations", json=fields)
    header = response.headers.get("x-klein-cost-usd")
    attempts = response.headers.get("x-klein-attempts")
    images = len(response.json()["data"]) if response.status_code == 200 else 0
    return Answer(phase, call, response.status_code, response.headers.get("x-klein-backend"), Decimal(header) if header is not None else None, int(attempts) if attempts else None, images)


def send_streamed(client: httpx.Client, base: str, phase: str, call: Call, fields: dict[str, Any]) -> Answer:
    """A streamed generation: its figures come in the completed event's `klein` object, not in headers."""
    completed: dict[str, Any] | None = None
    with client.stream("POST", f"{base}/v1/images/generations", json={**fields, "stream": True, "partial_images": 1}) as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "image_generation.completed":
                completed = json.loads(line.split(":", 1)[1])
    if completed is None:
        return Answer(phase, call, 502, None, None, None, 0)
    klein = completed["klein"]
    return Answer(phase, call, response.status_code, klein["backend"], Decimal(klein["cost_usd"]), int(klein["attempts"]), 1)


# ---- the gateway subprocess -----------------------------------------------------


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path
    multiproc_dir: Path
    emulators: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def banner(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""

    def logs(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the process group this test created, then wait; SIGKILL to it if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind by a parent that exited
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=5)


BANNER_EMULATOR = re.compile(r"^\s+(\w+)\s+(http://127\.0\.0\.1:\d+)\s*$", re.MULTILINE)
PID_FILE = re.compile(r"^(?P<kind>[a-z_]+)_(?P<pid>\d+)\.db$")


def start_gateway(workdir: Path, port: int, redis_url: str) -> Gateway:
    multiproc = workdir / "metrics"
    multiproc.mkdir(parents=True)
    env = clean_env()
    env.update(PROMETHEUS_MULTIPROC_DIR=str(multiproc), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(REDIS_URL=redis_url, KLEIN_STATE_NAMESPACE=f"observability-{workdir.name}")  # the workers share their state, as `serve` requires
    stdout, stderr = workdir / "gateway.out", workdir / "gateway.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--workers", str(WORKERS), "--port", str(port), "--config", str(REPO / "providers.yaml")],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Gateway(process, port, stdout, stderr, multiproc)


def worker_pids_with_files(gateway: Gateway) -> set[int]:
    return {int(m["pid"]) for p in gateway.multiproc_dir.iterdir() if (m := PID_FILE.match(p.name))}


def wait_for_gateway(gateway: Gateway, deadline: float) -> None:
    """Banner printed, both workers have built their app (each wrote its metric
    files), and /readyz answers 200 on fresh connections."""
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n{gateway.banner()}\n{gateway.logs()[-3000:]}")
        if "Metrics:" in gateway.banner() and len(worker_pids_with_files(gateway)) >= WORKERS:
            try:
                if all(httpx.get(f"{gateway.url}/readyz", timeout=2).status_code == 200 for _ in range(2 * WORKERS)):
                    gateway.emulators = dict(BANNER_EMULATOR.findall(gateway.banner()))
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway not ready within {START_TIMEOUT_S}s:\n{gateway.banner()}\n{gateway.logs()[-3000:]}")


def per_pid_requests(multiproc_dir: Path) -> dict[int, float]:
    """klein_requests_total summed per worker pid, from each worker's own counter file."""
    out: dict[int, float] = {}
    for path in multiproc_dir.glob("counter_*.db"):
        pid = int(PID_FILE.match(path.name)["pid"])
        total = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, _, _ = json.loads(key)
            if sample == "klein_requests_total":
                total += value
        out[pid] = total
    return out


def parent_pid(pid: int) -> int | None:
    try:
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


# ---- the run ---------------------------------------------------------------------


@dataclass
class Run:
    gateway: Gateway
    prom: PrometheusServer
    answers: list[Answer]
    metrics_text: str  # the gateway's /metrics after the load
    per_pid: dict[int, float]  # requests counted by each worker process
    worker_parents: dict[int, int | None]
    config_path: Path
    started: float
    load_s: float = 0.0

    def finite(self, expr: str) -> list[dict[str, Any]]:
        return [s for s in self.prom.query(expr) if math.isfinite(float(s["value"][1]))]

    def gauge(self, expr: str) -> float:
        result = self.prom.query(expr)
        assert result, f"{expr}: no data"
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Run]:
    if prometheus_binary() is None:
        pytest.skip(NO_PROMETHEUS)
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    workdir = tmp_path_factory.mktemp("observability")
    port = free_port()
    gateway = start_gateway(workdir, port, redis_server.url)
    prom: PrometheusServer | None = None
    try:
        # Prometheus starts while the gateway boots: it applies its scrape
        # config a few seconds after start, and the first scrapes may find the
        # target down.
        prom = start_prometheus(f"127.0.0.1:{port}", workdir / "prometheus")
        wait_for_gateway(gateway, deadline)
        prom.wait_for_scrapes(1, timeout=max(1.0, deadline - time.monotonic()))

        png = reference_png()
        answers: list[Answer] = []
        load_started = time.monotonic()
        # No keep-alive: every request opens a new connection, so the kernel
        # spreads them over both workers' accept() on the shared socket.
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=0)
        with httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=limits) as client, ThreadPoolExecutor(4) as pool:
            for phase, knobs, calls in PHASES:
                if knobs is not None:
                    admin = client.post(f"{gateway.emulators['local']}/_admin/knobs", json=knobs)
                    assert admin.status_code == 200, admin.text
                answers += pool.map(lambda c, p=phase: send(client, gateway.url, p, c, png), calls)
                prom.wait_for_scrapes(1, timeout=5)
        load_s = time.monotonic() - load_started
        prom.wait_for_scrapes(2, timeout=5)  # the last increases are in every rate window

        metrics_text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
        per_pid = per_pid_requests(gateway.multiproc_dir)
        yield Run(
            gateway=gateway,
            prom=prom,
            answers=answers,
            metrics_text=metrics_text,
            per_pid=per_pid,
            worker_parents={pid: parent_pid(pid) for pid in per_pid},
            config_path=workdir / "prometheus" / "prometheus.yml",
            started=started,
            load_s=load_s,
        )
    finally:
        if prom is not None:
            prom.stop()
        gateway.stop()


# ---- the dashboard and the rules, live --------------------------------------------


def test_every_dashboard_panel_returns_data(run: Run):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    empty = [f"{title!r}: {substitute_grafana_variables(expr)}" for title, expr in exprs if not run.finite(substitute_grafana_variables(expr))]
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_alert_rule_returns_data_and_prometheus_evaluates_it(run: Run):
    rules = alert_rules()
    empty = [f"{r['alert']}: {part}" for r in rules for part in evaluable_parts(r["expr"]) if not run.finite(part)]
    assert not empty, "alert expressions without data:\n" + "\n".join(empty)
    loaded = [r for g in run.prom.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]


def test_prometheus_scraped_the_gateway_through_the_shipped_job(run: Run):
    config = yaml.safe_load(run.config_path.read_text())
    assert [j["job_name"] for j in config["scrape_configs"]] == [JOB]
    assert config["rule_files"] == [str((REPO / "deploy" / "prometheus" / "alerts.yml").resolve())]
    assert run.prom.target_up()
    assert run.prom.scrapes() >= len(PHASES) + 3
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it ships with Debian's prometheus package)")
    # The config this run used (shipped job and rules, target and interval replaced) is valid too.
    result = subprocess.run([promtool, "check", "config", str(run.config_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the counters against what the callers received -------------------------------


def test_every_answer_carries_its_cost(run: Run):
    assert len(run.answers) == sum(len(calls) for _, _, calls in PHASES)
    missing = [a for a in run.answers if a.cost_usd is None]
    assert not missing, missing


def test_cost_counter_sums_to_the_cost_headers(run: Run):
    billed = sum(a.cost_usd for a in run.answers if a.cost_usd is not None)
    assert billed > 0
    # Every billed figure is quantized to 8 places before it is counted, so the
    # float sum rounds back to the exact Decimal sum of the headers.
    counted = sum(v for name, _, v in samples(run.metrics_text) if name == "klein_cost_usd_total")
    assert abs(Decimal(repr(counted)) - billed) <= USD_QUANTUM * len(run.answers)
    assert Decimal(repr(counted)).quantize(USD_QUANTUM) == billed
    # Prometheus stored the same figure.
    assert Decimal(repr(run.gauge(f'sum(klein_cost_usd_total{{job="{JOB}"}})'))).quantize(USD_QUANTUM) == billed


def test_images_counter_equals_the_images_received(run: Run):
    received = sum(a.images for a in run.answers)
    counted = sum(v for name, _, v in samples(run.metrics_text) if name == "klein_images_total")
    assert counted == received > 0
    assert run.gauge(f'sum(klein_images_total{{job="{JOB}"}})') == received


def test_requests_counter_equals_the_answers_by_status_class(run: Run):
    sent = Counter(f"{a.status // 100}xx" for a in run.answers)
    counted: Counter[str] = Counter()
    for name, labels, value in samples(run.metrics_text):
        if name == "klein_requests_total":
            counted[labels["status_class"]] += int(value)
    assert counted == sent
    assert {"2xx", "4xx", "5xx"} <= set(sent)


def test_requests_failed_over_while_the_local_emulator_answered_5xx(run: Run):
    during = [a for a in run.answers if a.phase == "local_5xx"]
    pinned = [a for a in during if a.call is PINNED_TO_LOCAL]
    assert all(500 <= a.status < 600 for a in pinned), pinned
    served = [a for a in during if a.call is not PINNED_TO_LOCAL]
    assert all(a.status == 200 and a.backend not in (None, "local") for a in served), served
    assert any(a.attempts and a.attempts >= 2 for a in served)
    assert run.gauge('sum(klein_failovers_total{from_backend="local"})') >= 1
    assert run.gauge('sum(klein_upstream_attempts_total{backend="local",outcome!="success"})') >= 1
    # Three failures in a row open a breaker (BreakerPolicy.consecutive_failures),
    # and at least one worker saw that many: the breaker panel showed it open.
    assert run.gauge('max(max_over_time(klein_backend_breaker_state{backend="local"}[5m]))') == 2


def test_both_worker_processes_served_requests(run: Run):
    serving = {pid: n for pid, n in run.per_pid.items() if n > 0}
    assert len(serving) == WORKERS, run.per_pid
    assert sum(serving.values()) == len(run.answers)
    assert run.gateway.process.pid not in serving  # the parent only supervises
    if Path("/proc").is_dir():
        assert set(run.worker_parents[pid] for pid in serving) == {run.gateway.process.pid}, run.worker_parents


@pytest.mark.parametrize(
    ("backend", "usd", "baseline"),
    [("fal", "0.00524288", 0.00524288), ("local", "0.00041506", None), ("runflow", "0.01404858", None)],
)
def test_set_backend_quote_publishes_the_quote_as_given(backend, usd, baseline, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = GatewayMetrics(baseline_backend="fal")
    metrics.set_backend_quote(backend, Decimal(usd))
    registry = metrics.registry
    assert registry.get_sample_value("klein_backend_quote_usd", {"backend": backend}) == pytest.approx(float(usd))
    assert registry.get_sample_value("klein_baseline_quote_usd") == pytest.approx(baseline if baseline else 0.0)


@pytest.mark.parametrize("outcome", ["success", "unreachable", "refused", "rejected", "failed", "unknown_outcome", "content_filtered"])
def test_a_named_backend_has_attempt_and_failover_series_at_zero(outcome, monkeypatch):
    # Without them a backend's first failure after a restart is a series born
    # at 1, which rate() cannot see: the failure-ratio panel stayed empty.
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = GatewayMetrics()
    metrics.set_breaker_state("local", "closed")
    registry = metrics.registry
    assert registry.get_sample_value("klein_upstream_attempts_total", {"backend": "local", "outcome": outcome}) == 0
    if outcome == "success":
        assert registry.get_sample_value("klein_upstream_duration_seconds_count", {"backend": "local", "outcome": outcome}) == 0
    else:
        assert registry.get_sample_value("klein_failovers_total", {"from_backend": "local", "reason": outcome}) == 0


# ---- logs and the price ladder ------------------------------------------------------


def request_lines(run: Run) -> list[dict]:
    lines = [json.loads(line) for line in run.gateway.logs().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("logger") == "klein.request"]


def test_every_request_writes_one_json_log_line_with_its_cost(run: Run):
    # Request lines are written by a thread a few milliseconds behind the answers
    # (gateway/observability/linewriter.py): wait for them, bounded, then count exactly.
    deadline = time.monotonic() + 5
    while len(requests := request_lines(run)) < len(run.answers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(requests) == len(run.answers)
    assert sum(Decimal(e["cost_usd"]) for e in requests) == sum(a.cost_usd or 0 for a in run.answers)


def test_price_ladder_shows_the_quote_for_one_1024_square_image(run: Run):
    table = httpx.post(f"{run.gateway.url}/v1/images/quote", json={"prompt": "x", "size": "1024x1024"}, timeout=5).json()
    quoted = {row["name"]: Decimal(row["cost_usd"]) for row in table["backends"] if row["cost_usd"] is not None}
    assert quoted["fal"] == Decimal("0.00524288")  # docs/design.md#worked-examples
    ladder = {labels["backend"]: v for name, labels, v in samples(run.metrics_text) if name == "klein_backend_quote_usd"}
    for backend, usd in quoted.items():
        if backend == "local":  # its quote follows the live figure its probe reports; the ladder shows the sheet's
            continue
        assert ladder[backend] == pytest.approx(float(usd), rel=1e-9), backend


def test_the_whole_run_stays_within_its_budget(run: Run):
    elapsed = time.monotonic() - run.started
    print(
        f"\nobservability e2e: {len(run.answers)} requests "
        f"({dict(Counter(a.status for a in run.answers))}), cost sum "
        f"{sum(a.cost_usd or 0 for a in run.answers)} USD, "
        f"{sum(a.images for a in run.answers)} images, {run.prom.scrapes()} scrapes, "
        f"requests per worker {run.per_pid}, load {run.load_s:.1f}s, {elapsed:.1f}s so far"
    )
    assert elapsed < BUDGET_S
