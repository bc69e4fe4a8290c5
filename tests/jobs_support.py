"""Helpers for async-job tests: a config with job settings, a webhook receiver,
and polling a job to its end."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from tests.gateway_support import PROVIDERS_YAML, REPO

PRICING = REPO / "pricing"
TERMINAL = {"succeeded", "failed", "canceled"}


def config_with(directory: Path, **settings: Any) -> Path:
    """The shipped providers.yaml with `gateway:` settings added, written to `directory`."""
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw.setdefault("gateway", {}).update(settings)
    path = directory / "providers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers the
    scripted statuses in order (then 204)."""

    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with lock:
                    receiver.deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 204
                    receiver.answered.append(status)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.deliveries) < count:
            time.sleep(0.02)
        return list(self.deliveries)


def wait_job(client: httpx.Client, base: str, job_id: str, *, headers: dict[str, str] | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Poll a job until it ends (or the timeout passes); its last state."""
    end = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < end:
        job = client.get(f"{base}/v1/images/jobs/{job_id}", headers=headers).json()
        if job.get("status") in TERMINAL:
            return job
        time.sleep(0.05)
    return job


def iter_pages(client: httpx.Client, base: str, *, headers: dict[str, str] | None = None, limit: int = 2, **params: str) -> Iterator[dict[str, Any]]:
    after = None
    while True:
        query = {"limit": str(limit), **params, **({"after": after} if after else {})}
        page = client.get(f"{base}/v1/images/jobs", params=query, headers=headers).json()
        yield page
        if not page["has_more"]:
            return
        after = page["last_id"]


def read_events(client: httpx.Client, url: str, *, headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, list[dict[str, Any]]]:
    """Follow a server-sent event stream to its end: its status and its events
    ({"id", "event", "data"}, data decoded; comments as {"comment"})."""
    found: list[dict[str, Any]] = []
    with client.stream("GET", url, headers=headers, timeout=timeout) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, found
        assert resp.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        for line in resp.iter_lines():
            if not line:
                if event:
                    found.append(event)
                event = {}
            elif line.startswith(":"):
                found.append({"comment": line[1:].strip()})
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[name] = json.loads(value) if name == "data" else value
    return 200, found
