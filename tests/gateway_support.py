"""Building blocks for gateway tests: an app from the shipped config, fake
adapters, a scripted DNS resolver, and a real uvicorn server on a free
loopback port."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from litestar import Litestar
from PIL import Image
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.domain.capabilities import Capabilities
from gateway.domain.job import ImageJob
from gateway.net.pinning import HostUnresolved
from gateway.observability.metrics import GatewayMetrics
from gateway.providers.base import Adapter, FailureClass, GeneratedImage, ProbeResult, ProviderError, ProviderResult

REPO = Path(__file__).resolve().parent.parent
PROVIDERS_YAML = REPO / "providers.yaml"

SECRETS = {
    "FAL_KEY": "fal-key-id:fal-secret-0000",
    "REPLICATE_API_TOKEN": "r8_replicate-secret-0000",
    "RUNFLOW_API_KEY": "rf_live_runflow_secret_0000",
    "EMPIRIOLABS_API_KEY": "sk-empiriolabs-secret-0000",
}
# The usage ledger stays in memory for in-process apps (nothing left on disk).
# A gateway a test builds or starts never writes the repository's own
# usage.sqlite3 (providers.yaml names it beside itself): where a test sets no
# ledger, make_app and clean_env give it this one (tests/conftest.py checks).
NO_LEDGER = {"KLEIN_USAGE_LEDGER": ":memory:"}
ENV: dict[str, str] = {**SECRETS, "KLEIN_LOCAL_URL": "http://local.test:9000", "KLEIN_USAGE_LEDGER": ":memory:"}


# What a gateway process started by a test must not inherit from whoever runs
# the tests: provider keys and addresses, caller keys, shared state, config and
# metrics directories, image-store and label settings. Each test sets its own.
NOT_INHERITED = frozenset({
    "FAL_KEY", "REPLICATE_API_TOKEN", "RUNFLOW_API_KEY", "EMPIRIOLABS_API_KEY",
    "KLEIN_LOCAL_URL", "KLEIN_FAL_BASE_URL", "KLEIN_REPLICATE_BASE_URL", "KLEIN_RUNFLOW_BASE_URL", "KLEIN_EMPIRIOLABS_BASE_URL",
    "KLEIN_GATEWAY_KEYS", "REDIS_URL", "KLEIN_CONFIG", "KLEIN_PRICING",
    "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir",
    "KLEIN_IMAGE_STORE", "KLEIN_IMAGE_DIR", "KLEIN_URL_SIGNING_KEY", "KLEIN_WORKERS", "KLEIN_METRICS_KEY_SECRET",
    "KLEIN_USAGE_LEDGER", "DATABASE_URL",
})  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment less NOT_INHERITED, an in-memory ledger unless `extra` names one, and `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(NO_LEDGER)
    env.update(extra)
    return env


def make_app(env: Mapping[str, str] | None = None, *, transport: httpx.AsyncBaseTransport | None = None, config: Path = PROVIDERS_YAML) -> Litestar:
    """The real app from the shipped providers.yaml and pricing/, probes off, a private metrics registry."""
    return create_app(config, env={**NO_LEDGER, **(ENV if env is None else env)}, transport=transport, probes=False, metrics=GatewayMetrics(registry=CollectorRegistry()))


def png_bytes(width: int, height: int, fmt: str = "PNG", color: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, fmt)
    return out.getvalue()


def image_size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


class FakeAdapter(Adapter):
    """An adapter whose behaviour a test scripts: a list of outcomes, one per call."""

    kind = "fake"
    default_capabilities = Capabilities()

    def __init__(self, name: str, outcomes: list[ProviderError | str] | None = None, delay_s: float = 0.0) -> None:
        self._name = name
        self.outcomes = list(outcomes or ["ok"])
        self.delay_s = delay_s
        self.calls: list[ImageJob] = []
        self.cancelled: list[str] = []
        self.probes = 0

    @property
    def name(self) -> str:
        return self._name

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        self.calls.append(job)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if self.delay_s:
            await asyncio.sleep(min(self.delay_s, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                raise ProviderError(FailureClass.UNKNOWN_OUTCOME, "deadline passed", job_id="job-slow", billed=True)
        if isinstance(outcome, ProviderError):
            raise outcome
        data = png_bytes(job.width, job.height)
        images = [GeneratedImage(data=data, content_type="image/png", width=job.width, height=job.height, seed=7 + i) for i in range(job.n)]
        return ProviderResult(images=images, seed=7, job_id=f"{self._name}-job")

    async def probe(self) -> ProbeResult:
        self.probes += 1
        return ProbeResult(ok=True)

    async def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True


def install_fakes(app: Litestar, fakes: Mapping[str, FakeAdapter]) -> None:
    """Swap the named backends' adapters for fakes (capabilities and prices stay real)."""
    backends = app.state.gateway.fleet.backends
    for name, fake in fakes.items():
        backends[name].adapter = fake


class ScriptedResolver:
    """DNS answers a test writes, never asked of real DNS.

    `answers` maps a name to one list of addresses per lookup (the last one
    repeated for every later lookup), or to "timeout" for a resolver that
    times out (a retryable HostUnresolved); any other name does not exist (a
    permanent HostUnresolved). `calls` records every name asked, in order.
    """

    def __init__(self, answers: Mapping[str, list[list[str]] | str]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[IPv4Address | IPv6Address]:
        self.calls.append(host)
        script = self.answers.get(host)
        if script is None:
            raise HostUnresolved(host, permanent=True)
        if script == "timeout":
            raise HostUnresolved(host, permanent=False)
        turn = self.calls.count(host) - 1
        return [ip_address(a) for a in script[min(turn, len(script) - 1)]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 in a background thread; stopped by the test."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def send_then_abandon(url: str, body: dict, *, after_s: float, headers: Mapping[str, str] | None = None) -> None:
    """POST a generation over a raw socket, wait `after_s`, and close the connection unanswered.

    Asserts the gateway sent nothing back before the caller left, so the test
    really abandons a request that was still being worked on.
    """
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n{extra}content-length: {len(payload)}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + payload)
        time.sleep(after_s)
        sock.settimeout(0.05)
        try:
            early = sock.recv(1)
        except TimeoutError:
            early = b""
        assert early == b"", "the gateway answered before the caller left"
