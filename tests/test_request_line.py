"""The request line's fast path: the old JSON byte for byte, caller-shaped fields
still scrubbed, a stuck stream never stalls the loop, and shutdown loses no line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from gateway import redaction
from gateway.observability import logs
from gateway.observability.linewriter import LineWriter
from gateway.redaction import REDACTED

BASE: dict[str, Any] = {
    "request_id": "req_0123abcd",
    "route": "generations",
    "status": 200,
    "backend": "fal",
    "attempts": 1,
    "cost_usd": Decimal("0.00524288"),
    "latency_s": 1.234567891,
    "overhead_s": 0.0012345678,
}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def lone_logger(name: str, handler: logging.Handler) -> logging.Logger:
    """A logger outside the logging tree, `handler` its only handler: pytest's
    own capture handlers, which would send every line the stdlib way, never reach it."""
    logger = logging.Logger(name, logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def old_line(fields: dict[str, Any], *, log_prompt_length: bool = False) -> tuple[str, float]:
    """The line the stdlib path writes for these fields (record, RedactingFilter, JsonFormatter)."""
    capture = _Capture()
    logger = lone_logger("klein.request.old", capture)
    logs.RequestLogger(logger, log_prompt_length=log_prompt_length).log(**fields)
    (record,) = capture.records
    logs.RedactingFilter().filter(record)
    return logs.JsonFormatter().format(record), record.created


@pytest.fixture
def request_log() -> Iterator[tuple[logs.RequestLogger, io.StringIO, logs.JsonLinesHandler]]:
    """A RequestLogger whose only handler is the JSON one (pytest's own capture
    would otherwise send every line the stdlib way)."""
    stream = io.StringIO()
    handler = logs.json_handler(stream)
    logger = lone_logger("klein.request.fast", handler)
    assert logs._sole_json_handler(logger, logging.INFO) is handler  # the fast path, not the stdlib one
    yield logs.RequestLogger(logger, log_prompt_length=True), stream, handler
    handler.close()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"status": 502, "backend": None, "attempts": 3},
        {"caller": "team-a", "prompt": "a red fox"},
        {"caller": 'équipe \u2028 \x01 "quoted" back\\slash', "error_code": "upstream_timeout"},
        {"latency_s": 0.0000012, "overhead_s": 1e-7, "cost_usd": Decimal("0")},
        {"latency_s": 12345.5, "overhead_s": 0.0, "cost_usd": Decimal("1.5E-7")},
    ],
)
def test_the_fast_line_is_byte_for_byte_the_stdlib_line(extra):
    fields = {**BASE, **extra}
    old, created = old_line(fields, log_prompt_length=True)
    entry = logs.RequestLogger(log_prompt_length=True).fields(**fields)
    level = logging.WARNING if fields["status"] >= 500 else logging.INFO
    new = logs.request_line("klein.request.old", level, entry, now=created)
    assert new == old + "\n"
    assert json.loads(new) == json.loads(old)


@pytest.mark.parametrize("now", [0.0, 1765100000.0, 1765100000.0004, 1765100000.9995, 1765100000.9999996, 1765100059.123456])
def test_the_timestamp_is_the_formatters(now):
    expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert logs.log_timestamp(now) == expected


@pytest.mark.parametrize(
    ("field", "value", "leaked"),
    [
        ("request_id", "req_configured-line-secret-77", "line-secret"),
        ("caller", "r8_abcdefgh1234", "r8_abcdefgh1234"),
        ("caller", "configured-line-secret-77", "configured-line-secret-77"),
        ("caller", "CONFIGURED-LINE-SECRET-77", "CONFIGURED-LINE-SECRET-77"),
        ("caller", "configured\\u002dline-secret-77", "line-secret-77"),
        ("error_code", "Bearer abcdefgh12345678", "abcdefgh12345678"),
        ("error_code", "token=hunter2hunter2", "hunter2hunter2"),
    ],
)
def test_a_secret_in_a_caller_shaped_field_is_scrubbed_on_the_fast_path(request_log, field, value, leaked):
    redaction.register_secrets(["configured-line-secret-77"])
    requests, stream, handler = request_log
    requests.log(**{**BASE, field: value})
    handler.flush()
    line = stream.getvalue()
    assert line.count("\n") == 1 and json.loads(line)["msg"] == "request"
    assert leaked not in line and REDACTED in line


class StuckStream(io.StringIO):
    """A stream whose writes block until released, as stderr into a full pipe does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


async def test_a_stuck_stream_does_not_stall_the_event_loop_and_drops_are_counted():
    stream = StuckStream()
    handler = logs.json_handler(stream)
    handler.lines.max_lines = 50
    logger = lone_logger("klein.request.stuck", handler)
    requests = logs.RequestLogger(logger, log_prompt_length=False)
    try:
        requests.log(**BASE)
        assert await asyncio.to_thread(stream.entered.wait, 5)  # the writer is now blocked in write()
        worst_lag = slowest_log = 0.0
        for i in range(200):  # 200 ticks of 1 ms, 20 request lines each, while the stream is stuck
            t0 = time.perf_counter()
            for _ in range(20):
                requests.log(**{**BASE, "request_id": f"req-{i}"})
            slowest_log = max(slowest_log, time.perf_counter() - t0)
            t1 = time.perf_counter()
            await asyncio.sleep(0.001)
            worst_lag = max(worst_lag, time.perf_counter() - t1 - 0.001)
        assert slowest_log < 0.05, f"20 log() calls took {slowest_log * 1000:.1f} ms with the stream stuck"
        assert worst_lag < 0.1, f"the loop lagged {worst_lag * 1000:.1f} ms with the stream stuck"
        assert handler.lines.dropped == 200 * 20 - 50
    finally:
        stream.release.set()
        handler.close()
    lines = super(StuckStream, stream).getvalue().splitlines()
    assert len(lines) == 1 + 50 + 1  # the stuck line, the queue, and the count of the dropped
    report = json.loads(lines[-1])
    assert "3950 request line(s) dropped" in report["msg"] and report["level"] == "warning" and report["ts"].endswith("Z")


class SlowStream(io.StringIO):
    def write(self, text: str) -> int:
        time.sleep(0.002)
        return super().write(text)


def test_every_line_logged_before_close_is_on_the_stream_after_it():
    stream = SlowStream()
    handler = logs.json_handler(stream)
    logger = lone_logger("klein.request.close", handler)
    requests = logs.RequestLogger(logger, log_prompt_length=False)
    try:
        for i in range(2000):
            requests.log(**{**BASE, "request_id": f"req-{i}"})
        requests.close()
        ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
        assert ids == [f"req-{i}" for i in range(2000)]
        requests.log(**{**BASE, "request_id": "after"})  # a later line starts the writer again
        requests.close()
        assert stream.getvalue().splitlines()[-1].count('"after"') == 1
    finally:
        handler.close()


async def test_the_apps_shutdown_writes_the_queued_request_lines():
    from litestar.testing import AsyncTestClient

    from tests.gateway_support import ENV, FakeAdapter, install_fakes, make_app

    stream = SlowStream()
    handler = logs.json_handler(stream)
    logger = lone_logger("klein.request.app", handler)
    app = make_app(ENV)
    install_fakes(app, {name: FakeAdapter(name) for name in app.state.gateway.fleet.backends})
    app.state.gateway.request_log = logs.RequestLogger(logger, log_prompt_length=False)
    try:
        async with AsyncTestClient(app) as client:
            for i in range(20):
                answer = await client.post("/v1/images/generations", json={"prompt": "a lighthouse", "size": "512x512"}, headers={"x-request-id": f"app-{i}"})
                assert answer.status_code == 200
        ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
        assert ids == [f"app-{i}" for i in range(20)]
    finally:
        handler.close()


def test_a_writer_with_no_thread_yet_flushes_inline():
    stream = io.StringIO()
    writer = LineWriter(stream)
    assert writer.flush() and writer.close()
    writer.shutdown()
    writer.submit("late\n")  # after shutdown: written at once, no thread
    assert stream.getvalue() == "late\n"
