"""A real Prometheus for tests: started on a free loopback port, stopped by pid.

`start_prometheus(target)` writes a config that reuses the shipped scrape job
(`deploy/prometheus/prometheus.yml`, job `klein-gateway`) and the shipped
rules (`deploy/prometheus/alerts.yml`), with the target pointed at `target`
("host:port") and scrape and rule evaluation every second. Point it at a test
metrics server or at a running gateway alike.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
JOB = "klein-gateway"
DEFAULT_BINARY = "/usr/bin/prometheus"


def prometheus_binary() -> str | None:
    """The Prometheus server binary, or None if it is not installed."""
    for candidate in (os.environ.get("PROMETHEUS_BIN"), DEFAULT_BINARY, shutil.which("prometheus")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config_for(target: str, *, interval: str = "1s", scrape_config: Path = SCRAPE_CONFIG, rules: Path = ALERT_RULES, token: str | None = None) -> dict[str, Any]:
    """The shipped config, with the klein-gateway job scraping `target`
    every `interval` and rules evaluated as often; with `token`, as the
    gateway's KLEIN_METRICS_TOKEN (needed once caller keys are required)."""
    shipped = yaml.safe_load(scrape_config.read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == JOB)
    job = copy.deepcopy(job)
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = interval
    job["scrape_timeout"] = interval
    if token is not None:
        job["authorization"] = {"type": "Bearer", "credentials": token}
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules.resolve())],
        "scrape_configs": [job],
    }


@dataclass
class PrometheusServer:
    """A running Prometheus; `url` is its HTTP API base."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (a scalar comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_until(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError, RuntimeError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Prometheus: {what} within {timeout}s; log: {self.log_tail()}")

    def wait_ready(self, timeout: float = 10) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prometheus exited: {self.log_tail()}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200

        self.wait_until(ready, timeout=timeout, what="ready")

    def scrapes(self) -> int:
        """How many samples of `up` the klein-gateway job has stored (one per scrape)."""
        result = self.query(f'count_over_time(up{{job="{JOB}"}}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def wait_for_scrapes(self, n: int, timeout: float = 10) -> None:
        """Wait until `n` more scrapes of the target have succeeded."""
        start = self.scrapes()
        self.wait_until(lambda: self.scrapes() >= start + n and self.target_up(), timeout=timeout, what=f"{n} scrapes")

    def target_up(self) -> bool:
        result = self.query(f'up{{job="{JOB}"}}')
        return bool(result) and result[0]["value"][1] == "1"

    def log_tail(self, chars: int = 2000) -> str:
        log = self.workdir / "prometheus.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    def stop(self) -> None:
        """Stop by pid: SIGTERM, then SIGKILL if it will not go."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def start_prometheus(target: str, workdir: Path, *, interval: str = "1s", binary: str | None = None, rules: Path = ALERT_RULES, token: str | None = None) -> PrometheusServer:
    """Start Prometheus scraping `target` ("host:port") with the shipped job
    and rules (or `rules`, e.g. a variant without `for:`); storage and config
    live in `workdir`. The caller stops it."""
    binary = binary or prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus binary not found")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for(target, interval=interval, rules=rules, token=token)))
    port = free_port()
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    server = PrometheusServer(process=process, port=port, workdir=workdir)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def running_prometheus(target: str, workdir: Path, *, interval: str = "1s") -> Iterator[PrometheusServer]:
    """`start_prometheus` as a context manager that always stops it."""
    server = start_prometheus(target, workdir, interval=interval)
    try:
        yield server
    finally:
        server.stop()


# ---- the expressions the shipped dashboard and rules evaluate ------------------

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "klein-gateway.json"

# Grafana variables as the live test substitutes them: `$__rate_interval` is
# at least four scrape intervals in Grafana (60 s with a 15 s scrape); 1m also
# spans many samples at the test's 1 s scrape.
GRAFANA_TEST_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$backend": ".*",
}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    dashboard = json.loads(path.read_text())
    return [(p["title"], t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def substitute_grafana_variables(expr: str, variables: dict[str, str] = GRAFANA_TEST_VARIABLES) -> str:
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", variables[name]).replace(name, variables[name])
    if "$" in expr:
        raise ValueError(f"unsubstituted Grafana variable in {expr!r}")
    return expr


def alert_rules(path: Path = ALERT_RULES) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


_SET_OPERATORS = ("and", "or", "unless")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_MODIFIER = r"\s*(?:(?:on|ignoring|group_left|group_right)\s*\([^()]*\)|bool)\s*"


def _top_level_scan(expr: str) -> Iterator[tuple[int, str]]:
    """(index, char) of characters outside parentheses, braces, brackets and strings."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, c
        i += 1


def _unwrap(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def _strip_modifiers(expr: str) -> str:
    return re.sub(rf"^(?:{_MODIFIER})+", "", expr).strip()


def _split_at(expr: str, operators: tuple[str, ...], words: bool) -> list[str] | None:
    for i, _ in _top_level_scan(expr):
        for op in operators:
            if not expr.startswith(op, i):
                continue
            if words and not (re.match(r"\W", expr[i - 1 : i] or " ") and re.match(r"\W", expr[i + len(op) : i + len(op) + 1] or " ")):
                continue
            if not words and op in (">", "<") and expr[i + 1 : i + 2] == "=":
                continue
            return [expr[:i], expr[i + len(op) :]]
    return None


def evaluable_parts(expr: str) -> list[str]:
    """The sub-expressions of a rule that must each return data: the rule
    split at top-level `and`/`or`/`unless` and at comparisons (thresholds
    dropped, both sides kept unless a side is a number)."""
    previous = None
    while expr != previous:
        previous, expr = expr, _unwrap(_strip_modifiers(expr))
    for operators, words in ((_SET_OPERATORS, True), (_COMPARISONS, False)):
        split = _split_at(expr, operators, words)
        if split:
            return [p for side in split for p in evaluable_parts(side)]
    try:
        float(expr)
        return []
    except ValueError:
        return [expr]
