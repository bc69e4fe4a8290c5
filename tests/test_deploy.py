"""The shipped Prometheus config, alert rules and Grafana dashboard: checked by
promtool, against the metric names GatewayMetrics defines, and live against a
real Prometheus scraping GatewayMetrics.render()."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.observability.metrics import GatewayMetrics
from tests.prometheus_server import (
    ALERT_RULES,
    DASHBOARD,
    JOB,
    REPO,
    SCRAPE_CONFIG,
    alert_rules,
    dashboard_exprs,
    dashboard_panels,
    evaluable_parts,
    prometheus_binary,
    running_prometheus,
    substitute_grafana_variables,
)

DEPLOY = REPO / "deploy"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"

PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "inf", "nan"})


def defined_metric_names() -> frozenset[str]:
    return GatewayMetrics(registry=CollectorRegistry()).metric_names()


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not
    functions, keywords, label names or inside strings and matchers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", s):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus); CI installs it")
    return path


# ---- static checks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "path"),
    [("config", SCRAPE_CONFIG), ("rules", ALERT_RULES)],
    ids=["prometheus.yml", "alerts.yml"],
)
def test_promtool_accepts_the_shipped_files(command, path):
    result = subprocess.run([promtool(), "check", command, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_their_unit_tests_expect():
    result = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_has_the_gateway_job_on_port_8080():
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "alerts.yml" in config["rule_files"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (backend) (rate(klein_cost_usd_total{backend=~"a|b"}[5m])) * 3600', {"klein_cost_usd_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(klein_gateway_overhead_seconds_bucket[1m])))", {"klein_gateway_overhead_seconds_bucket"}),
        ("max by (backend) (x) < on () group_left () max(y) and on() z > bool 2", {"x", "y", "z"}),
        ('(sum(increase(a_total[1h])) or vector(0)) - b{outcome!="success"}', {"a_total", "b"}),
    ],
)
def test_metric_name_extraction(expr, names):
    assert metric_names_in(expr) == names


def test_dashboard_has_its_rows_in_order():
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Spend", "Routing savings", "Latency", "Failover and health", "Traffic", "Async jobs", "Streams", "Batches"]
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_dashboard_expr_uses_only_metrics_the_gateway_defines():
    defined = defined_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        used = metric_names_in(substitute_grafana_variables(expr))
        assert used, f"{title}: no metric in {expr!r}"
        assert used <= defined, f"{title}: unknown metrics {sorted(used - defined)}"


def test_dashboard_variables_use_defined_metrics_and_the_provisioned_source():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    query = variables["backend"]["query"]["query"]
    metric = re.fullmatch(r"label_values\((\w+),\s*backend\)", query).group(1)
    assert metric in defined_metric_names()
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    source = next(d for d in datasources if d["type"] == "prometheus")
    assert variables["datasource"]["current"]["value"] == source["uid"]
    for panel in dashboard_panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_dashboard_provider_loads_json_files():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "klein.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert DASHBOARD.parent.name == "dashboards" and DASHBOARD.suffix == ".json"


def test_every_alert_rule_uses_only_defined_metrics_and_says_what_to_do():
    defined = defined_metric_names()
    rules = alert_rules()
    assert {"KleinBackendDown", "KleinErrorRateHigh", "KleinSpendRateHigh", "KleinGatewayOverheadHigh", "KleinSavingsLost"} <= {r["alert"] for r in rules}
    readme = (DEPLOY / "README.md").read_text()
    for rule in rules:
        used = metric_names_in(rule["expr"])
        assert used and used <= defined, f"{rule['alert']}: unknown metrics {sorted(used - defined)}"
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
        assert rule["alert"] in readme, f"{rule['alert']} is not explained in deploy/README.md"


# ---- live: a real Prometheus scraping GatewayMetrics ------------------------------


class MetricsServer:
    """Serves one GatewayMetrics' render() at /metrics on 127.0.0.1."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, content_type = metrics.render()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def target(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> MetricsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


PRICES = {"fal": Decimal("0.005"), "replicate": Decimal("0.001"), "runflow": Decimal("0.0134")}
ONE_MP = Decimal("1.048576")


def simulate_traffic(metrics: GatewayMetrics, round_: int) -> Decimal:
    """One round of requests through the public interface; returns what the
    callers were billed (the sum of their x-klein-cost-usd headers)."""
    billed = Decimal(0)
    baseline = PRICES["fal"] * ONE_MP
    gen, edit = "/v1/images/generations", "/v1/images/edits"
    # Served by replicate, the cheapest: savings against fal.
    for i in range(3):
        usd = PRICES["replicate"] * ONE_MP
        metrics.observe_attempt(backend="replicate", outcome="success", latency_s=1.5 + i / 10)
        metrics.record_spend(backend="replicate", caller=f"team-{i % 2}", usd=usd, megapixels=ONE_MP, images=1, baseline_usd=baseline)
        metrics.observe_request(route=gen, status=200, backend="replicate", latency_s=1.6 + i / 10, overhead_s=0.0008 + i / 1000)
        billed += usd
    # replicate unreachable, failover to fal.
    metrics.observe_attempt(backend="replicate", outcome="unreachable", latency_s=0.05)
    metrics.record_failover(from_backend="replicate", reason="unreachable")
    metrics.observe_attempt(backend="fal", outcome="success", latency_s=2.2)
    metrics.record_spend(backend="fal", caller="team-0", usd=baseline, megapixels=ONE_MP, images=1, baseline_usd=baseline)
    metrics.observe_request(route=edit, status=200, backend="fal", latency_s=2.4, overhead_s=0.002)
    billed += baseline
    # a streamed generation: a preview first, then its image
    metrics.observe_stream_event(route="generations", since_start_s=0.7, first=True, preview=True)
    metrics.observe_stream_event(route="generations", since_start_s=1.4, first=False, preview=False)
    # fal billed but timed out, runflow delivered at more than the baseline: possible double spend.
    metrics.observe_attempt(backend="fal", outcome="unknown_outcome", latency_s=30.0)
    metrics.record_spend(backend="fal", caller="team-1", usd=baseline, megapixels=ONE_MP, images=1, baseline_usd=Decimal(0))
    metrics.record_failover(from_backend="fal", reason="unknown_outcome")
    metrics.record_double_spend(backend="fal")
    metrics.observe_attempt(backend="runflow", outcome="success", latency_s=3.0)
    runflow = PRICES["runflow"] * ONE_MP
    metrics.record_spend(backend="runflow", caller="team-1", usd=runflow, megapixels=ONE_MP, images=1, baseline_usd=baseline)
    metrics.record_billed(backend="runflow", source="run_cost", billed_usd=runflow * Decimal("1.1"), estimated_usd=runflow)  # its run cost says 10% more
    metrics.observe_request(route=gen, status=200, backend="runflow", latency_s=33.5, overhead_s=0.004)
    billed += baseline + runflow
    # Everything failed: a 502 and nothing billed.
    metrics.observe_attempt(backend="runflow", outcome="failed", latency_s=0.4)
    metrics.observe_request(route=gen, status=502, backend=None, latency_s=0.5, overhead_s=0.0006)
    # A rejected input never reaches a backend.
    metrics.observe_request(route=gen, status=400, backend=None, latency_s=0.002, overhead_s=0.002)
    # Breakers move: replicate (cheaper than the baseline) ends open.
    metrics.set_breaker_state("fal", "closed")
    metrics.set_breaker_state("runflow", "half_open" if round_ % 2 else "closed")
    metrics.set_breaker_state("replicate", "open" if round_ >= 1 else "closed")
    return billed


@pytest.fixture
def loaded_metrics() -> Iterator[GatewayMetrics]:
    metrics = GatewayMetrics(registry=CollectorRegistry(), baseline_backend="fal")
    for backend, price in PRICES.items():
        metrics.set_backend_price(backend, price)
        metrics.set_breaker_state(backend, "closed")
    yield metrics


def test_live_prometheus_evaluates_every_panel_and_alert(tmp_path: Path, loaded_metrics: GatewayMetrics):
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian/Ubuntu: apt-get install prometheus); CI installs it")
    started = time.monotonic()
    metrics = loaded_metrics
    billed = Decimal(0)
    with MetricsServer(metrics) as server, running_prometheus(server.target, tmp_path / "prometheus") as prom:
        with metrics.in_flight():  # one request stays in flight across the scrapes
            # Prometheus 2.x applies a new scrape config about 5 s after start.
            prom.wait_for_scrapes(1, timeout=10)
            for round_ in range(3):  # traffic over three scrapes
                billed += simulate_traffic(metrics, round_)
                prom.wait_for_scrapes(1, timeout=3)
            prom.wait_for_scrapes(2, timeout=4)

            # The cost counter sums to what callers were billed.
            total = prom.query(f'sum(klein_cost_usd_total{{job="{JOB}"}})')
            assert float(total[0]["value"][1]) == pytest.approx(float(billed), abs=1e-12)
            assert float(prom.query("sum(klein_in_flight_requests)")[0]["value"][1]) == 1

            empty = []
            for title, expr in dashboard_exprs():
                query = substitute_grafana_variables(expr)
                result = prom.query(query)
                if not any(math.isfinite(float(s["value"][1])) for s in result):
                    empty.append(f"panel {title!r}: {query} -> {result}")
            for rule in alert_rules():
                for part in evaluable_parts(rule["expr"]):
                    result = prom.query(part)
                    if not any(math.isfinite(float(s["value"][1])) for s in result):
                        empty.append(f"alert {rule['alert']}: {part} -> {result}")
            assert not empty, "\n".join(empty)

            # Prometheus itself evaluates every shipped rule without error, and the
            # cheap backend's open breaker is already noticed (pending: `for` not yet over).
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) == len(alert_rules())
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
            states = {r["name"]: r["state"] for r in rules}
            assert states["KleinSavingsLost"] == "pending"
            assert states["KleinBackendDown"] == "pending"
            assert states["KleinNoBackendUp"] == "inactive"
    assert time.monotonic() - started < 30
