"""/metrics does not identify callers and is not open to whoever can reach the API.

Caller labels are HMAC-SHA256 under a server secret (or a configured name):
the unsalted SHA-256 prefix that let a reader of /metrics confirm a guessed
key offline is gone from /metrics and from the logs. /metrics can require a
bearer token, and can be served on its own port by `klein-gateway serve`,
with several workers' figures summed.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError
from gateway.domain.callers import LABEL_SECRET_ENV, Caller, caller_label
from gateway.observability.logs import configure_logging
from gateway.observability.metrics_access import MetricsAccess, parse_port
from tests.gateway_support import ENV, NO_LEDGER, REPO, FakeAdapter, clean_env, free_port, install_fakes, make_app
from tests.redis_server import RedisServer

CALLER_KEY = "gw-live-key-for-metrics-0123"
OLD_LABEL = "key_" + hashlib.sha256(CALLER_KEY.encode()).hexdigest()[:10]
SERVER_SECRET = "metrics-label-secret-for-tests"


def hmac_label(key: str, secret: str) -> str:
    return "key_" + hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


# ---- caller labels -----------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        (Caller(CALLER_KEY), hmac_label(CALLER_KEY, SERVER_SECRET)),
        (Caller(CALLER_KEY, name="team-search"), "team-search"),
        (Caller(CALLER_KEY, name="billing.batch_2"), "billing.batch_2"),
        (Caller(CALLER_KEY, name="has space"), hmac_label(CALLER_KEY, SERVER_SECRET)),  # not a tidy label: hashed instead
        (Caller(CALLER_KEY, name="x" * 65), hmac_label(CALLER_KEY, SERVER_SECRET)),
        (Caller(CALLER_KEY, name=""), hmac_label(CALLER_KEY, SERVER_SECRET)),
    ],
)
def test_caller_label_is_the_configured_name_or_a_keyed_hash(monkeypatch, caller, expected):
    monkeypatch.setenv(LABEL_SECRET_ENV, SERVER_SECRET)
    assert caller_label(caller) == expected


def test_caller_label_depends_on_the_server_secret_and_is_not_the_plain_hash(monkeypatch):
    monkeypatch.setenv(LABEL_SECRET_ENV, SERVER_SECRET)
    first = caller_label(Caller(CALLER_KEY))
    monkeypatch.setenv(LABEL_SECRET_ENV, SERVER_SECRET + "-rotated")
    second = caller_label(Caller(CALLER_KEY))
    assert first != second
    for label in (first, second):
        assert not label.startswith(OLD_LABEL) and CALLER_KEY not in label


def test_without_a_configured_secret_each_process_draws_its_own(monkeypatch):
    monkeypatch.delenv(LABEL_SECRET_ENV, raising=False)
    here = caller_label(Caller(CALLER_KEY))
    assert here == caller_label(Caller(CALLER_KEY))  # stable within the process
    code = f"from gateway.domain.callers import Caller, caller_label; print(caller_label(Caller({CALLER_KEY!r})))"
    env = {k: v for k, v in os.environ.items() if k != LABEL_SECRET_ENV} | {"PYTHONPATH": str(REPO)}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True).stdout.strip()
    assert other.startswith("key_") and other != here
    assert OLD_LABEL not in (here, other)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(stream=stream, level="INFO", secrets=[])
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


TOKEN = "scrape-token-5d1c9a"


async def test_metrics_and_request_logs_carry_the_keyed_label_never_the_old_hash(monkeypatch, log_output):
    monkeypatch.setenv(LABEL_SECRET_ENV, SERVER_SECRET)
    app = make_app({**ENV, "KLEIN_GATEWAY_KEYS": CALLER_KEY, "KLEIN_METRICS_TOKEN": TOKEN})
    install_fakes(app, {name: FakeAdapter(name) for name in app.state.gateway.fleet.backends})
    async with AsyncTestClient(app) as client:
        ok = await client.post("/v1/images/generations", json={"prompt": "a lighthouse", "size": "512x512"}, headers={"authorization": f"Bearer {CALLER_KEY}"})
        assert ok.status_code == 200
        exposition = (await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})).text
    spend = [s for f in text_string_to_metric_families(exposition) for s in f.samples if s.name == "klein_cost_usd_total" and s.value > 0]
    assert [s.labels["caller"] for s in spend] == [hmac_label(CALLER_KEY, SERVER_SECRET)]
    request_lines = [json.loads(line) for line in log_output.getvalue().splitlines() if '"request_id"' in line]
    assert [line["caller"] for line in request_lines] == [hmac_label(CALLER_KEY, SERVER_SECRET)]
    for text in (exposition, log_output.getvalue()):
        assert OLD_LABEL not in text and CALLER_KEY not in text


# ---- who may read /metrics -----------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "authorization", "status"),
    [
        (None, None, 200),  # nothing configured: open, as before
        (None, "Bearer anything", 200),
        (TOKEN, None, 401),
        (TOKEN, "Bearer wrong-token", 401),
        (TOKEN, f"Bearer {TOKEN}x", 401),
        (TOKEN, f"Basic {TOKEN}", 401),
        (TOKEN, TOKEN, 401),
        (TOKEN, "Bearer ünïcode", 401),
        (TOKEN, f"Bearer {TOKEN}", 200),
        (TOKEN, f"bearer  {TOKEN} ", 200),
    ],
)
async def test_metrics_requires_the_bearer_token_when_one_is_configured(configured, authorization, status):
    env = {**ENV, **({"KLEIN_METRICS_TOKEN": configured} if configured else {})}
    app = make_app(env)
    async with AsyncTestClient(app) as client:
        headers = {"authorization": authorization.encode()} if authorization else {}
        answer = await client.get("/metrics", headers=headers)
    assert answer.status_code == status
    if status == 401:
        error = answer.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_metrics_token"
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in answer.text
    else:
        assert "klein_requests_total" in answer.text


@pytest.mark.parametrize(
    ("guard", "authorization", "status", "code"),
    [
        ({}, None, 401, "metrics_closed"),  # keys required, nothing guarding /metrics: closed
        ({}, f"Bearer {CALLER_KEY}", 401, "metrics_closed"),  # a caller's key does not open it
        ({"KLEIN_METRICS_TOKEN": TOKEN}, None, 401, "invalid_metrics_token"),
        ({"KLEIN_METRICS_TOKEN": TOKEN}, f"Bearer {TOKEN}", 200, None),
        ({"KLEIN_METRICS_PORT": "9464"}, None, 404, "not_found"),  # served on its own port instead
    ],
    ids=["keys-only", "keys-caller-key", "token-missing", "token-given", "own-port"],
)
async def test_metrics_are_not_open_on_the_api_port_when_caller_keys_are_required(guard, authorization, status, code, caplog):
    caplog.set_level(logging.INFO)
    app = make_app({**ENV, "KLEIN_GATEWAY_KEYS": CALLER_KEY, **guard})
    async with AsyncTestClient(app) as client:
        answer = await client.get("/metrics", headers={"authorization": authorization} if authorization else {})
    assert answer.status_code == status, answer.text
    if code is not None:
        assert answer.json()["error"]["code"] == code
        assert "klein_requests_total" not in answer.text and CALLER_KEY not in answer.text
    else:
        assert "klein_requests_total" in answer.text
    said = "/metrics answers 401 on this port" in caplog.text
    assert said == (code == "metrics_closed"), "the start-up log says /metrics is closed exactly when it is"


async def test_the_api_port_does_not_serve_metrics_when_they_have_their_own():
    app = make_app({**ENV, "KLEIN_METRICS_PORT": "9464"})
    async with AsyncTestClient(app) as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert "klein_" not in answer.text


@pytest.mark.parametrize(("value", "port"), [(None, None), ("", None), ("9464", 9464), (65535, 65535)])
def test_metrics_port_parses(value, port):
    assert parse_port(value) == port


@pytest.mark.parametrize("value", ["0", "65536", "abc", "-1"])
def test_a_bad_metrics_port_is_refused(value):
    with pytest.raises(ConfigError, match="KLEIN_METRICS_PORT"):
        MetricsAccess.from_env({"KLEIN_METRICS_PORT": value})


def test_serve_refuses_a_bad_metrics_port_with_a_clear_message():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--metrics-port", "70000", "--config", str(REPO / "providers.yaml")],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **NO_LEDGER}, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "KLEIN_METRICS_PORT must be from 1 to 65535" in proc.stderr


# ---- `serve --metrics-port` with two workers -----------------------------------

REQUESTS = 8


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this test started, then SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=5)


def test_serve_with_a_metrics_port_sums_both_workers_there_behind_the_token(tmp_path: Path, redis_server: RedisServer):
    port, metrics_port = free_port(), free_port()
    env = clean_env()
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", KLEIN_METRICS_TOKEN=TOKEN, KLEIN_GATEWAY_KEYS=CALLER_KEY)
    env.update(REDIS_URL=redis_server.url, KLEIN_STATE_NAMESPACE=f"metrics-access-{tmp_path.name}")  # the workers share their state, as `serve` requires
    out = tmp_path / "gateway.out"
    with open(out, "wb") as stdout, open(tmp_path / "gateway.err", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--workers", "2", "--port", str(port), "--metrics-port", str(metrics_port), "--config", str(REPO / "providers.yaml")],
            cwd=REPO, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    api, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=15) as client:
            while True:
                assert process.poll() is None, (tmp_path / "gateway.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "gateway did not start"
                try:
                    if client.get(f"{api}/readyz").status_code == 200 and client.get(metrics, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            auth = {"authorization": f"Bearer {CALLER_KEY}"}
            statuses = [client.post(f"{api}/v1/images/generations", json={"prompt": "a lighthouse", "size": "512x512"}, headers=auth).status_code for _ in range(REQUESTS)]
            assert statuses == [200] * REQUESTS
            assert client.get(f"{api}/metrics").status_code == 404
            assert client.get(metrics).status_code == 401
            assert client.get(metrics, headers={"authorization": "Bearer nope"}).status_code == 401
            exposition = client.get(metrics, headers={"authorization": f"Bearer {TOKEN}"}).text
    finally:
        _stop(process)
    samples = [s for f in text_string_to_metric_families(exposition) for s in f.samples]
    served = sum(s.value for s in samples if s.name == "klein_requests_total" and s.labels.get("route") == "generations")
    assert served == REQUESTS  # every worker's requests, summed through PROMETHEUS_MULTIPROC_DIR
    callers = {s.labels["caller"] for s in samples if s.name == "klein_cost_usd_total" and s.value > 0}
    assert len(callers) == 1 and next(iter(callers)).startswith("key_")  # both workers share one label secret
    assert OLD_LABEL not in exposition and CALLER_KEY not in exposition
    assert f"127.0.0.1:{metrics_port}/metrics" in out.read_text()
