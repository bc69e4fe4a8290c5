"""`klein-gateway serve --emulate` as a user runs it: the banner, its examples, and whose addresses win.

One gateway process serves the module: emulated hosted providers, the local
backend at an address the user set (an emulator this test owns, standing in
for a real GPU service), and caller keys required.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.cli import banner
from tests.emulators.launcher import EmulatorFleet, explicit_base_urls
from tests.gateway_support import REPO, clean_env, free_port

GATEWAY_KEY = "gw-banner-test-key-0123"
START_TIMEOUT_S = 60


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, {}),
        ({"KLEIN_LOCAL_URL": "http://gpu-box:8090"}, {"local": "http://gpu-box:8090"}),
        ({"KLEIN_LOCAL_URL": "  "}, {}),
        ({"KLEIN_FAL_BASE_URL": "http://rig:1", "FAL_KEY": "k"}, {"fal": "http://rig:1"}),
        ({"KLEIN_REPLICATE_BASE_URL": "http://a", "KLEIN_RUNFLOW_BASE_URL": "http://b"}, {"replicate": "http://a", "runflow": "http://b"}),
        ({"FAL_KEY": "a key alone changes nothing"}, {}),
    ],
)
def test_explicit_base_urls_are_the_ones_left_alone(environ, expected):
    assert explicit_base_urls(environ) == expected


def _args() -> argparse.Namespace:
    return argparse.Namespace(host="127.0.0.1", port=8080)


def test_banner_without_keys_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("KLEIN_GATEWAY_KEYS", raising=False)
    text = banner(_args(), None)
    assert "authorization" not in text.lower() and "api_key='any'" in text


def test_banner_with_keys_sends_one_in_every_example_without_printing_it(monkeypatch):
    monkeypatch.setenv("KLEIN_GATEWAY_KEYS", f"{GATEWAY_KEY},second-key-4567")
    text = banner(_args(), None)
    examples = [line for line in text.splitlines() if line.strip().startswith(("curl", "python"))]
    assert len(examples) == 4
    assert all("KLEIN_GATEWAY_KEYS" in line for line in examples)
    assert GATEWAY_KEY not in text and "second-key-4567" not in text


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    banner: str
    connected_at_banner: bool
    local: EmulatorFleet
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _connects(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    local = EmulatorFleet.start_in_thread(["local"])
    port = free_port()
    env = clean_env()
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", KLEIN_LOCAL_URL=local["local"].base_url, KLEIN_GATEWAY_KEYS=GATEWAY_KEY)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        connected = False
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"gateway exited with {process.wait(5)}:\n{''.join(lines)}")
            if line.startswith("Klein Gateway on"):
                connected = _connects(port)  # the instant the banner appears
            lines.append(line)
            if line.startswith("Metrics:"):
                break
        else:
            raise TimeoutError("no banner")
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield Served(process, port, "".join(lines), connected, local, env)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the group this fixture started
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        local.stop_thread()


def test_banner_prints_only_once_the_port_accepts_connections(served):
    assert served.connected_at_banner


def test_an_explicit_local_url_is_left_alone_and_the_banner_says_so(served):
    emulated = dict(re.findall(r"^\s+(\w+)\s+(http://127\.0\.0\.1:\d+)\s*$", served.banner, re.MULTILINE))
    assert set(emulated) == {"fal", "replicate", "runflow", "empiriolabs"}
    assert f"Not emulated: local at {served.local['local'].base_url} (KLEIN_LOCAL_URL is set)" in served.banner
    before = served.local["local"].app.stats.generations
    answer = httpx.post(
        f"{served.url}/v1/images/generations",
        json={"model": "local/flux-2-klein-4b", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"},
        headers={"authorization": f"Bearer {GATEWAY_KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-klein-backend"] == "local"
    assert served.local["local"].app.stats.generations == before + 1  # the user's backend did the work


def test_the_banner_curl_example_works_as_printed(served):
    line = next(line.strip() for line in served.banner.splitlines() if "/images/quote" in line)
    run = subprocess.run(["bash", "-c", line + " -w '\\n%{http_code}'"], env=served.env, capture_output=True, text=True, timeout=60)
    assert run.stdout.rstrip().endswith("200"), run.stdout + run.stderr
    unauthenticated = line.replace(' -H "authorization: Bearer ${KLEIN_GATEWAY_KEYS%%,*}"', "")
    assert unauthenticated != line
    refused = subprocess.run(["bash", "-c", unauthenticated + " -o /dev/null -w '%{http_code}'"], env=served.env, capture_output=True, text=True, timeout=60)
    assert refused.stdout == "401", shlex.quote(refused.stdout)


def test_a_taken_port_fails_before_any_banner(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env()
        env["PYTHONPATH"] = str(REPO)
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", str(taken.getsockname()[1])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Klein Gateway on" not in proc.stdout
    assert "Address already in use" in proc.stderr
