"""`klein-gateway serve` as a real subprocess, for shutdown and fleet tests.

Each process runs in its own session (so its workers share its process group)
and is stopped through its own pid only. The providers are emulators the test
runs itself (tests.emulators.launcher.EmulatorFleet), so several gateway
processes can share them and a test can turn their knobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.gateway_support import REPO, clean_env, free_port


def write_config(path: Path, **gateway: Any) -> Path:
    """The shipped providers.yaml with `gateway:` settings changed, and probes slowed
    so they do not blur what a test counts."""
    raw = yaml.safe_load((REPO / "providers.yaml").read_text())
    raw["gateway"].update(gateway)
    path.write_text(yaml.safe_dump(raw))
    return path


class GatewayProcess:
    def __init__(self, workdir: Path, config: Path, env: dict[str, str], *, workers: int = 1, port: int | None = None, name: str = "gateway") -> None:
        self.workdir = workdir
        self.config = config
        self.env = env
        self.workers = workers
        self.port = port or free_port()
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.starts}.log"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 40.0) -> GatewayProcess:
        self.starts += 1
        env = clean_env(**self.env)
        env["PYTHONPATH"] = str(REPO)
        # Several workers without Redis keep state per worker: these tests check other things, so say so.
        unshared = ["--allow-unshared-state"] if self.workers > 1 and not env.get("REDIS_URL") else []
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port), "--workers", str(self.workers), *unshared, "--config", str(self.config), "--pricing", str(REPO / "pricing")],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Every worker answers /readyz 200 on fresh connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
            try:
                if all(httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200 for _ in range(2 * self.workers)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready within {timeout}s:\n{self.logs()[-3000:]}")

    def sigterm(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """Whatever is left of this process and its workers (its own process group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
