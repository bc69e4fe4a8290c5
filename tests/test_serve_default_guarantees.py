"""The plain `serve` command keeps the promises the docs make, with no flags.

Without REDIS_URL every worker keeps idempotency keys and rate limits in its
own memory, so several workers would each keep their own copy. These tests
run the real default command (`python -m gateway.cli serve --emulate`, no
--workers) pinned to two CPUs, where one worker per CPU would have meant two,
and check what a caller sees: one Idempotency-Key pays one image however many
requests race with it, and a key limited to 5 requests a minute is served 5.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.cli import ONE_WORKER_NOTE
from tests.gateway_support import free_port

REPO = Path(__file__).resolve().parents[1]
BANNER_EMULATOR = re.compile(r"^\s+(\w+)\s+(http://127\.0\.0\.1:\d+)\s*$", re.MULTILINE)
BODY = {"prompt": "a lighthouse", "size": "512x512", "response_format": "b64_json"}
OPEN_KEY, LIMITED_KEY = "sk-klein-open-caller", "sk-klein-limited-caller"


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


KEYS_FILE = f"""keys:
  - name: open
    key_sha256: {_sha(OPEN_KEY)}
  - name: limited
    key_sha256: {_sha(LIMITED_KEY)}
    rate_limit: {{requests_per_minute: 5}}
"""


def _two_cpus() -> None:
    """Run on two CPUs where the machine has them, so a per-CPU default would start two workers."""
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            os.sched_setaffinity(0, set(cpus[:2]))


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KLEIN_", "REDIS_", "DATABASE_", "PROMETHEUS_")) and not k.endswith("_BASE_URL")}
    keys = tmp / "keys.yaml"
    keys.write_text(KEYS_FILE)
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", KLEIN_KEYS_FILE=str(keys), KLEIN_USAGE_LEDGER=":memory:")
    return env


@dataclass
class Served:
    url: str
    banner: Path
    emulators: dict[str, str]

    def paid_calls(self) -> int:
        return sum(httpx.get(f"{base}/_admin/stats", timeout=5).json()["paid_calls"] for base in self.emulators.values())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-default")
    port = free_port()
    out = tmp / "gateway.out"
    with open(out, "wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--port", str(port), "--config", str(REPO / "providers.yaml"), "--log-level", "warning"],
            cwd=REPO,
            env=_env(tmp),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_two_cpus,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}:\n{out.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError(out.read_text(errors="replace"))
            try:
                if "Metrics:" in out.read_text(errors="replace") and httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield Served(url, out, dict(BANNER_EMULATOR.findall(out.read_text(errors="replace"))))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def _post(url: str, key: str, headers: dict[str, str] | None = None) -> int:
    """One request on its own connection, as separate callers would send it."""
    with httpx.Client(timeout=60) as client:
        return client.post(f"{url}/v1/images/generations", json=BODY, headers={"authorization": f"Bearer {key}", **(headers or {})}).status_code


def test_the_default_command_says_it_runs_one_worker_and_why(served: Served) -> None:
    assert ONE_WORKER_NOTE in served.banner.read_text(errors="replace")


def test_ten_racing_requests_with_one_idempotency_key_pay_one_image(served: Served) -> None:
    assert served.emulators, "no emulator addresses in the banner"
    before = served.paid_calls()
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: _post(served.url, OPEN_KEY, {"Idempotency-Key": "race-one"}), range(10)))
    assert 200 in codes, codes
    assert served.paid_calls() - before == 1


def test_a_key_limited_to_five_a_minute_is_served_five_of_eight(served: Served) -> None:
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _post(served.url, LIMITED_KEY), range(8)))
    assert sorted(codes) == [200] * 5 + [429] * 3, codes


def test_several_workers_without_redis_are_refused_with_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "KLEIN_"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--port", "1", "--config", str(REPO / "providers.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--workers 2 without REDIS_URL" in result.stderr
    assert "--allow-unshared-state" in result.stderr
