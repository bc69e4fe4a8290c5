"""`serve --emulate --emulator-ports`: pinned ports for the emulators, and clear refusals."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from gateway.cli import _emulator_ports, main
from tests.gateway_support import REPO, clean_env, free_port

EMULATED = ["fal", "replicate", "runflow", "empiriolabs", "local"]


@pytest.mark.parametrize(
    ("spec", "first", "ports"),
    [
        (None, 0, {}),
        ("", 0, {}),
        ("9100", 9100, {}),
        ("fal=9101", 0, {"fal": 9101}),
        ("fal=9101, local=9105", 0, {"fal": 9101, "local": 9105}),
    ],
)
def test_emulator_ports_spec_reads_a_first_port_or_name_port_pairs(spec: str | None, first: int, ports: dict[str, int]) -> None:
    assert _emulator_ports(spec, EMULATED) == (first, ports)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("65533", "no room"),
        ("0", "no room"),
        ("fal", "not name=port"),
        ("fal=x", "not name=port"),
        ("fal=70000", "not name=port"),
        ("acme=9100", "not an emulated backend"),
    ],
)
def test_emulator_ports_spec_refuses_what_it_cannot_bind(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        _emulator_ports(spec, EMULATED)


def test_emulator_ports_without_emulate_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--emulator-ports", "9100"]) == 2
    assert "--emulator-ports needs --emulate" in capsys.readouterr().err


def test_serve_emulate_binds_the_emulator_on_the_port_it_was_given() -> None:
    gateway_port, fal_port = free_port(), free_port()
    env = clean_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--emulator-ports", f"fal={fal_port}", "--port", str(gateway_port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(timeout=2) as client:
            for _ in range(600):
                try:
                    if client.get(f"http://127.0.0.1:{gateway_port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    pytest.fail(f"serve exited with {proc.returncode}")
                time.sleep(0.1)
            else:
                pytest.fail("serve did not answer /healthz within 60 s")
            stats = client.get(f"http://127.0.0.1:{fal_port}/_admin/stats")
        assert stats.status_code == 200, stats.text
        with socket.create_connection(("127.0.0.1", fal_port), timeout=2):
            pass
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
