"""GatewayMetrics and the JSON request log: values read back from the registry,
caller bounding, savings arithmetic, several worker processes, redaction."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.logs import JsonFormatter, RedactingFilter, RequestLogger, configure_logging, secrets_from_env
from gateway.observability.metrics import OVERHEAD_BUCKETS, REQUEST_BUCKETS, GatewayMetrics, mark_process_dead, status_class
from gateway.redaction import REDACTED, looks_like_secret, redact, register_secrets

GEN = "/v1/images/generations"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> GatewayMetrics:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    return GatewayMetrics(registry=registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# ---- request path -----------------------------------------------------------


def test_in_flight_counts_while_the_block_runs_and_after_an_exception(metrics, registry):
    assert value(registry, "klein_in_flight_requests") == 0
    with metrics.in_flight():
        with metrics.in_flight():
            assert value(registry, "klein_in_flight_requests") == 2
        assert value(registry, "klein_in_flight_requests") == 1
    with pytest.raises(RuntimeError):
        with metrics.in_flight():
            raise RuntimeError("boom")
    assert value(registry, "klein_in_flight_requests") == 0


@pytest.mark.parametrize(
    ("status", "backend", "expected_class", "expected_backend"),
    [(200, "fal", "2xx", "fal"), (422, None, "4xx", "none"), (502, None, "5xx", "none"), (503, "replicate", "5xx", "replicate")],
)
def test_observe_request_counts_by_status_class_and_backend(metrics, registry, status, backend, expected_class, expected_backend):
    metrics.observe_request(route=GEN, status=status, backend=backend, latency_s=1.2, overhead_s=0.0015)
    labels = {"route": GEN, "status_class": expected_class, "backend": expected_backend}
    assert value(registry, "klein_requests_total", **labels) == 1


def test_observe_request_fills_latency_and_overhead_histograms(metrics, registry):
    metrics.observe_request(route=GEN, status=200, backend="fal", latency_s=1.2, overhead_s=0.0015)
    metrics.observe_request(route=GEN, status=200, backend="fal", latency_s=0.04, overhead_s=0.0004)
    assert value(registry, "klein_request_duration_seconds_count", route=GEN) == 2
    assert value(registry, "klein_request_duration_seconds_sum", route=GEN) == pytest.approx(1.24)
    assert value(registry, "klein_request_duration_seconds_bucket", route=GEN, le="0.05") == 1
    assert value(registry, "klein_request_duration_seconds_bucket", route=GEN, le="1.5") == 2
    # Sub-millisecond overhead lands in its own bucket.
    assert value(registry, "klein_gateway_overhead_seconds_bucket", route=GEN, le="0.0005") == 1
    assert value(registry, "klein_gateway_overhead_seconds_bucket", route=GEN, le="0.002") == 2
    assert value(registry, "klein_gateway_overhead_seconds_sum", route=GEN) == pytest.approx(0.0019)


def test_buckets_span_sub_millisecond_overhead_and_minute_long_images():
    assert OVERHEAD_BUCKETS[0] <= 0.0005 and OVERHEAD_BUCKETS[-1] >= 1
    assert {0.002, 0.01} <= set(OVERHEAD_BUCKETS)  # the p50 and p99 targets
    assert REQUEST_BUCKETS[0] <= 0.05 and REQUEST_BUCKETS[-1] >= 60
    assert list(REQUEST_BUCKETS) == sorted(REQUEST_BUCKETS)
    assert list(OVERHEAD_BUCKETS) == sorted(OVERHEAD_BUCKETS)


@pytest.mark.parametrize(("status", "expected"), [(200, "2xx"), (201, "2xx"), (404, "4xx"), (429, "4xx"), (504, "5xx"), (99, "other"), (600, "other")])
def test_status_class(status, expected):
    assert status_class(status) == expected


@pytest.mark.parametrize("outcome", ["success", "unreachable", "refused", "rejected", "failed", "unknown_outcome", "content_filtered"])
def test_observe_attempt_by_backend_and_outcome(metrics, registry, outcome):
    metrics.observe_attempt(backend="replicate", outcome=outcome, latency_s=2.5)
    assert value(registry, "klein_upstream_attempts_total", backend="replicate", outcome=outcome) == 1
    assert value(registry, "klein_upstream_duration_seconds_count", backend="replicate", outcome=outcome) == 1
    assert value(registry, "klein_upstream_duration_seconds_bucket", backend="replicate", outcome=outcome, le="3.0") == 1
    assert value(registry, "klein_upstream_duration_seconds_bucket", backend="replicate", outcome=outcome, le="2.0") == 0


def test_observe_attempt_accepts_failure_class_enum(metrics, registry):
    from gateway.providers.base import FailureClass

    metrics.observe_attempt(backend="fal", outcome=FailureClass.UNKNOWN_OUTCOME, latency_s=60)
    assert value(registry, "klein_upstream_attempts_total", backend="fal", outcome="unknown_outcome") == 1


def test_record_failover_and_double_spend(metrics, registry):
    metrics.record_failover(from_backend="replicate", reason="unreachable")
    metrics.record_failover(from_backend="replicate", reason="unreachable")
    metrics.record_failover(from_backend="fal", reason="refused")
    metrics.record_double_spend(backend="fal")
    assert value(registry, "klein_failovers_total", from_backend="replicate", reason="unreachable") == 2
    assert value(registry, "klein_failovers_total", from_backend="fal", reason="refused") == 1
    assert value(registry, "klein_possible_double_spend_total", backend="fal") == 1


@pytest.mark.parametrize(("state", "gauge", "up"), [("closed", 0, 1), ("half_open", 1, 1), ("open", 2, 0)])
def test_breaker_state_and_up(metrics, registry, state, gauge, up):
    metrics.set_breaker_state("runflow", state)
    assert value(registry, "klein_backend_breaker_state", backend="runflow") == gauge
    assert value(registry, "klein_backend_up", backend="runflow") == up


def test_breaker_state_accepts_the_health_enum_and_rejects_unknown_states(metrics, registry):
    from gateway.health.view import BreakerState

    metrics.set_breaker_state("fal", BreakerState.HALF_OPEN)
    assert value(registry, "klein_backend_breaker_state", backend="fal") == 1
    with pytest.raises(ValueError, match="unknown breaker state"):
        metrics.set_breaker_state("fal", "melted")


def test_backend_price_is_published_for_a_1024_square_and_the_baseline_is_marked(metrics, registry):
    metrics.set_backend_price("fal", Decimal("0.005"))
    metrics.set_backend_price("replicate", Decimal("0.001"))
    # docs/design.md#worked-examples: 1024x1024 on fal is $0.00524288.
    assert value(registry, "klein_backend_quote_usd", backend="fal") == pytest.approx(0.00524288)
    assert value(registry, "klein_backend_quote_usd", backend="replicate") == pytest.approx(0.001048576)
    assert value(registry, "klein_baseline_quote_usd") == pytest.approx(0.00524288)


def test_naming_a_backend_creates_its_counters_at_zero(metrics, registry):
    metrics.set_breaker_state("local", "closed")
    for name in ("klein_images_total", "klein_megapixels_total", "klein_possible_double_spend_total", "klein_savings_usd_total"):
        assert value(registry, name, backend="local") == 0


# ---- spend and savings -------------------------------------------------------


def test_record_spend_counts_cost_megapixels_and_images(metrics, registry):
    metrics.record_spend(backend="fal", caller="team-a", usd=Decimal("0.01048576"), megapixels=Decimal("2.097152"), images=2, baseline_usd=None)
    assert value(registry, "klein_cost_usd_total", backend="fal", caller="team-a") == pytest.approx(0.01048576)
    assert value(registry, "klein_megapixels_total", backend="fal") == pytest.approx(2.097152)
    assert value(registry, "klein_images_total", backend="fal") == 2
    assert value(registry, "klein_baseline_cost_usd_total", backend="fal") == 0


@pytest.mark.parametrize(
    ("usd", "baseline", "savings", "excess"),
    [
        # replicate served what fal (the baseline) would have charged $0.00524288 for.
        ("0.00104858", "0.00524288", 0.0041943, 0.0),
        # the baseline itself served: no savings, no excess.
        ("0.00524288", "0.00524288", 0.0, 0.0),
        # failover to runflow cost more than the baseline.
        ("0.01404858", "0.00524288", 0.0, 0.0088057),
        # a failed billed attempt, given a zero baseline: all of it counts against savings.
        ("0.00524288", "0", 0.0, 0.00524288),
    ],
)
def test_savings_against_the_baseline(metrics, registry, usd, baseline, savings, excess):
    metrics.record_spend(backend="x", caller=None, usd=Decimal(usd), megapixels=Decimal("1.048576"), images=1, baseline_usd=Decimal(baseline))
    assert value(registry, "klein_savings_usd_total", backend="x") == pytest.approx(savings)
    assert value(registry, "klein_excess_cost_usd_total", backend="x") == pytest.approx(excess)
    assert value(registry, "klein_baseline_cost_usd_total", backend="x") == pytest.approx(float(baseline))
    net = value(registry, "klein_savings_usd_total", backend="x") - value(registry, "klein_excess_cost_usd_total", backend="x")
    assert net == pytest.approx(float(Decimal(baseline) - Decimal(usd)))


def test_a_request_with_a_failed_billed_attempt_nets_its_true_savings(metrics, registry):
    # Attempt 1 on fal was billed and failed; attempt 2 on replicate delivered.
    metrics.record_spend(backend="fal", caller="k1", usd=Decimal("0.00524288"), megapixels=Decimal("1.048576"), images=1, baseline_usd=Decimal(0))
    metrics.record_spend(backend="replicate", caller="k1", usd=Decimal("0.00104858"), megapixels=Decimal("1.048576"), images=1, baseline_usd=Decimal("0.00524288"))
    savings = sum(value(registry, "klein_savings_usd_total", backend=b) for b in ("fal", "replicate"))
    excess = sum(value(registry, "klein_excess_cost_usd_total", backend=b) for b in ("fal", "replicate"))
    assert savings - excess == pytest.approx(-0.00104858)


def test_cost_total_equals_the_sum_of_billed_attempts(metrics, registry):
    headers = [Decimal("0.00524288"), Decimal("0.00104858"), Decimal("0.01404858"), Decimal("0.0085"), Decimal("0.000415")] * 40
    for i, usd in enumerate(headers):
        metrics.record_spend(backend=f"b{i % 3}", caller=f"k{i % 7}", usd=usd, megapixels=Decimal("1.048576"), images=1, baseline_usd=None)
    total = sum(s.value for f in registry.collect() if f.name == "klein_cost_usd" for s in f.samples if s.name == "klein_cost_usd_total")
    assert total == pytest.approx(float(sum(headers)), abs=1e-12)


@pytest.mark.parametrize("field", ["usd", "megapixels", "images", "baseline_usd"])
def test_negative_spend_is_refused(metrics, field):
    kw = dict(backend="fal", caller=None, usd=Decimal("0.01"), megapixels=Decimal(1), images=1, baseline_usd=Decimal("0.01"))
    kw[field] = -1 if field == "images" else Decimal("-0.01")
    with pytest.raises(ValueError):
        metrics.record_spend(**kw)


def test_caller_labels_are_bounded_then_other(registry, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = GatewayMetrics(registry=registry, max_callers=3)
    for caller in ["a", "b", "a", "c", "d", "e", "b", None]:
        metrics.record_spend(backend="fal", caller=caller, usd=Decimal("1"), megapixels=Decimal(1), images=1, baseline_usd=None)
    callers = {s.labels["caller"]: s.value for f in registry.collect() if f.name == "klein_cost_usd" for s in f.samples if s.name == "klein_cost_usd_total"}
    assert callers == {"a": 2, "b": 2, "c": 1, "other": 2, "anonymous": 1}


def test_a_caller_that_looks_like_a_key_never_becomes_a_label(metrics, registry):
    metrics.record_spend(backend="fal", caller="sk-abcdefghijklmnop", usd=Decimal("1"), megapixels=Decimal(1), images=1, baseline_usd=None)
    body, _ = metrics.render()
    assert b"sk-abcdefghijklmnop" not in body
    assert value(registry, "klein_cost_usd_total", backend="fal", caller="redacted") == 1


def test_render_is_prometheus_text_with_every_family(metrics):
    metrics.observe_request(route=GEN, status=200, backend="fal", latency_s=1, overhead_s=0.001)
    metrics.record_spend(backend="fal", caller=None, usd=Decimal("0.5"), megapixels=Decimal(1), images=1, baseline_usd=Decimal("0.5"))
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"klein_requests", "klein_cost_usd", "klein_gateway_overhead_seconds", "klein_in_flight_requests", "klein_backend_breaker_state"} <= families


def test_a_private_registry_also_carries_process_figures(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    body, _ = GatewayMetrics().render()
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"process_resident_memory_bytes", "python_info"} <= families


def test_metric_names_cover_exposed_samples(metrics, registry):
    metrics.observe_request(route=GEN, status=200, backend="fal", latency_s=1, overhead_s=0.001)
    metrics.observe_attempt(backend="fal", outcome="success", latency_s=1)
    metrics.record_spend(backend="fal", caller="k", usd=Decimal("0.5"), megapixels=Decimal(1), images=1, baseline_usd=Decimal("0.6"))
    metrics.record_failover(from_backend="fal", reason="refused")
    metrics.record_double_spend(backend="fal")
    metrics.set_breaker_state("fal", "open")
    metrics.set_backend_price("fal", Decimal("0.005"))
    exposed = {s.name for f in registry.collect() if f.name.startswith("klein_") for s in f.samples if not s.name.endswith("_created")}
    assert exposed <= metrics.metric_names()
    assert all(n.startswith("klein_") for n in metrics.metric_names())


def test_two_apps_in_one_process_do_not_collide(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    a, b = GatewayMetrics(), GatewayMetrics()
    a.record_double_spend(backend="fal")
    assert a.registry.get_sample_value("klein_possible_double_spend_total", {"backend": "fal"}) == 1
    assert b.registry.get_sample_value("klein_possible_double_spend_total", {"backend": "fal"}) is None


def test_repeated_observations_through_remembered_children_add_up_in_every_series(metrics, registry):
    for status, backend in ((200, "fal"), (200, "fal"), (502, None), (200, "replicate")):
        metrics.observe_request(route=GEN, status=status, backend=backend, latency_s=0.5, overhead_s=0.002)
        metrics.observe_attempt(backend=backend or "fal", outcome="success" if status == 200 else "failed", latency_s=0.4)
    for _ in range(3):
        metrics.record_spend(backend="fal", caller="team-a", usd=Decimal("0.01"), megapixels=Decimal("1"), images=1, baseline_usd=Decimal("0.02"))
    assert value(registry, "klein_requests_total", route=GEN, status_class="2xx", backend="fal") == 2
    assert value(registry, "klein_requests_total", route=GEN, status_class="5xx", backend="none") == 1
    assert value(registry, "klein_gateway_overhead_seconds_count", route=GEN) == 4
    assert value(registry, "klein_upstream_attempts_total", backend="fal", outcome="failed") == 1
    assert value(registry, "klein_upstream_duration_seconds_count", backend="fal", outcome="success") == 2
    assert value(registry, "klein_cost_usd_total", backend="fal", caller="team-a") == pytest.approx(0.03)
    assert value(registry, "klein_savings_usd_total", backend="fal") == pytest.approx(0.03)
    assert value(registry, "klein_images_total", backend="fal") == 3


# ---- several worker processes -------------------------------------------------

WORKER_SPEND = {
    "w1": [("fal", "team-a", "0.00524288"), ("fal", "team-a", "0.00524288"), ("replicate", "team-b", "0.00104858")],
    "w2": [("fal", "team-b", "0.00524288"), ("runflow", "team-a", "0.01404858")],
}


def _worker(name: str, ready, done) -> None:  # runs in a spawned process
    from gateway.observability.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    for backend, caller, usd in WORKER_SPEND[name]:
        metrics.record_spend(backend=backend, caller=caller, usd=Decimal(usd), megapixels=Decimal("1.048576"), images=1, baseline_usd=Decimal("0.00524288"))
    metrics.observe_request(route=GEN, status=200, backend="fal", latency_s=1.0, overhead_s=0.001)
    metrics.set_breaker_state("replicate", "open" if name == "w1" else "closed")
    with metrics.in_flight():
        ready.put(os.getpid())
        done.wait(timeout=20)


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_two_worker_processes_sum_into_one_scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=_worker, args=(name, ready, done)) for name in WORKER_SPEND]
    for w in workers:
        w.start()
    try:
        pids = [ready.get(timeout=30) for _ in workers]
        scraper = GatewayMetrics()  # the process that serves /metrics
        during = _samples(scraper.render()[0])
    finally:
        done.set()
        for w in workers:
            w.join(timeout=20)
            if w.is_alive():
                os.kill(w.pid, 9)
    assert all(w.exitcode == 0 for w in workers)

    expected: dict[tuple[str, str], Decimal] = {}
    for spends in WORKER_SPEND.values():
        for backend, caller, usd in spends:
            expected[(backend, caller)] = expected.get((backend, caller), Decimal(0)) + Decimal(usd)
    for (backend, caller), usd in expected.items():
        got = during[("klein_cost_usd_total", (("backend", backend), ("caller", caller)))]
        assert got == pytest.approx(float(usd), abs=1e-15)
    total = sum(v for (name, _), v in during.items() if name == "klein_cost_usd_total")
    assert total == pytest.approx(float(sum(expected.values())), abs=1e-12)
    assert during[("klein_images_total", (("backend", "fal"),))] == 3
    assert during[("klein_requests_total", (("backend", "fal"), ("route", GEN), ("status_class", "2xx")))] == 2
    assert during[("klein_in_flight_requests", ())] == 2  # livesum
    assert during[("klein_backend_breaker_state", (("backend", "replicate"),))] == 2  # the worst live worker
    assert during[("klein_backend_up", (("backend", "replicate"),))] == 0

    for pid in pids:
        mark_process_dead(pid)
    after = _samples(GatewayMetrics().render()[0])
    assert ("klein_in_flight_requests", ()) not in after or after[("klein_in_flight_requests", ())] == 0
    assert ("klein_backend_breaker_state", (("backend", "replicate"),)) not in after
    assert sum(v for (name, _), v in after.items() if name == "klein_cost_usd_total") == total  # counters survive


# ---- logs --------------------------------------------------------------------

# name -> (text as it could appear, the part that must never be written)
SECRETS = {
    "fal": ("Key 3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f:0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    "bearer": ("Bearer gw-live-9f8e7d6c5b4a", "gw-live-9f8e7d6c5b4a"),
    "openai": ("sk-proj-AbCdEf0123456789", "AbCdEf0123456789"),
    "replicate": ("r8_Z1y2X3w4V5u6T7s8R9q0P", "Z1y2X3w4V5u6T7s8R9q0P"),
    "runflow": ("rf_live_7h6g5f4e3d2c1b", "7h6g5f4e3d2c1b"),
    "redis": ("redis://:s3cretpass@cache:6379/0", "s3cretpass"),
    "query": ("https://api.example/v1?api_key=qk-1234567&x=1", "qk-1234567"),
    "json": ('{"token": "tok-98765"}', "tok-98765"),
}


class FlushedLogStream(io.StringIO):
    """A log stream whose `getvalue` first waits for the request lines queued
    for the writer thread (`gateway.observability.linewriter`)."""

    handler: logging.Handler | None = None

    def getvalue(self) -> str:
        if self.handler is not None:
            self.handler.flush()
        return super().getvalue()


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = FlushedLogStream()
    level = logging.getLogger().level
    handler = configure_logging(stream=stream, secrets=["configured-secret-value-42"])
    stream.handler = handler
    yield stream
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_redact_scrubs_every_key_shape(name):
    shown, secret_part = SECRETS[name]
    scrubbed = redact(f"calling upstream with {shown} now")
    assert secret_part not in scrubbed
    assert REDACTED in scrubbed
    assert scrubbed.startswith("calling upstream with") and scrubbed.endswith("now")


@pytest.mark.parametrize("text", ["Key rotation is due", "max_tokens=4", "request 7c9e6679-7425-40de-944b-e07fc1f90ae7 done", "fal served 2 images"])
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_configured_secrets_and_environment_credentials_are_scrubbed(monkeypatch):
    monkeypatch.setenv("EMPIRIOLABS_API_KEY", "empirio-plain-value")
    monkeypatch.setenv("KLEIN_GATEWAY_KEYS", "gwkey-one, gwkey-two")
    found = secrets_from_env()
    assert {"empirio-plain-value", "gwkey-one", "gwkey-two"} <= set(found)
    register_secrets(found)
    assert "empirio-plain-value" not in redact("auth failed for empirio-plain-value")
    assert looks_like_secret("gwkey-two")
    assert not looks_like_secret("team-a")


def test_log_lines_never_carry_keys(log_stream):
    log = logging.getLogger("klein.test")
    log.warning("upstream said %s", f"401 for {SECRETS['fal'][0]}")
    log.info("headers", extra={"authorization": SECRETS["bearer"][0], "detail": {"note": SECRETS["replicate"][0]}})
    log.error("with configured-secret-value-42 inside")
    try:
        raise RuntimeError(f"connect failed: {SECRETS['redis'][0]} {SECRETS['runflow'][0]}")
    except RuntimeError:
        log.exception("state store down")
    out = log_stream.getvalue()
    for name in ("fal", "bearer", "replicate", "redis", "runflow"):
        assert SECRETS[name][1] not in out
    assert "configured-secret-value-42" not in out
    lines = out.splitlines()
    assert len(lines) == 4
    assert all(json.loads(line)["logger"] == "klein.test" for line in lines)
    assert "RuntimeError" in json.loads(lines[-1])["exc"]


def test_the_redacting_filter_protects_plain_handlers_too():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("klein.plain")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError(SECRETS["openai"][0])
        except ValueError:
            log.exception("failed with %s", SECRETS["bearer"][0])
    finally:
        log.removeHandler(handler)
        log.propagate = True
    out = stream.getvalue()
    assert "AbCdEf0123456789" not in out and "gw-live-9f8e7d6c5b4a" not in out
    assert "ValueError" in out


def test_one_json_line_per_request_with_the_request_fields(log_stream):
    requests = RequestLogger(log_prompt_length=False)
    for i, status in enumerate([200, 502, 200]):
        requests.log(
            request_id=f"req-{i}",
            route=GEN,
            status=status,
            backend="fal" if status == 200 else None,
            attempts=i + 1,
            cost_usd=Decimal("0.00524288"),
            latency_s=1.234567891,
            overhead_s=0.0012345678,
            caller="team-a",
            prompt="a red fox in the snow",
        )
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    assert [e["request_id"] for e in entries] == ["req-0", "req-1", "req-2"]
    first = entries[0]
    assert first["msg"] == "request" and first["logger"] == "klein.request" and first["level"] == "info"
    assert (first["route"], first["status"], first["backend"], first["attempts"]) == (GEN, 200, "fal", 1)
    assert first["cost_usd"] == "0.00524288"  # exact, as in x-klein-cost-usd
    assert first["latency_s"] == 1.234568 and first["overhead_s"] == 0.001235
    assert entries[1]["level"] == "warning" and entries[1]["backend"] is None
    assert "red fox" not in log_stream.getvalue()
    assert "prompt_chars" not in first


def test_prompt_length_is_logged_only_on_opt_in_and_never_the_text(log_stream):
    RequestLogger(log_prompt_length=True).log(
        request_id="r",
        route=GEN,
        status=200,
        backend="fal",
        attempts=1,
        cost_usd=Decimal("0.01"),
        latency_s=1.0,
        overhead_s=0.001,
        prompt="a red fox in the snow",
    )
    entry = json.loads(log_stream.getvalue())
    assert entry["prompt_chars"] == len("a red fox in the snow")
    assert "red fox" not in log_stream.getvalue()


@pytest.mark.parametrize(("env", "expected"), [(None, False), ("0", False), ("1", True), ("true", True), ("no", False)])
def test_prompt_length_opt_in_from_the_environment(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("KLEIN_LOG_PROMPT_LENGTH", raising=False)
    else:
        monkeypatch.setenv("KLEIN_LOG_PROMPT_LENGTH", env)
    entry = RequestLogger().fields(
        request_id="r",
        route=GEN,
        status=200,
        backend="fal",
        attempts=1,
        cost_usd=Decimal("0.01"),
        latency_s=1.0,
        overhead_s=0.001,
        prompt="four",
    )
    assert ("prompt_chars" in entry) is expected
    assert "four" not in json.dumps(entry)


def test_prompt_passed_as_an_extra_field_is_withheld(log_stream):
    logging.getLogger("klein.api").info("parsed", extra={"prompt": "secret plans", "n": 2})
    entry = json.loads(log_stream.getvalue())
    assert entry["prompt"] == REDACTED and entry["n"] == 2


def test_configure_logging_twice_keeps_one_handler(log_stream):
    handler = configure_logging(stream=log_stream, secrets=[])
    try:
        logging.getLogger("klein.x").info("once")
        assert log_stream.getvalue().count('"once"') == 1
    finally:
        logging.getLogger().removeHandler(handler)


def test_json_formatter_writes_one_line_even_for_multiline_messages():
    record = logging.LogRecord("klein", logging.INFO, __file__, 1, "line one\nline two", None, None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["msg"] == "line one\nline two"
