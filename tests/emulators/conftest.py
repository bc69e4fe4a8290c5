"""One emulator fleet for the session, served on free ports of 127.0.0.1.

It runs in a thread with its own event loop (EmulatorFleet.start_in_thread),
so every test's own loop talks to it over real sockets. Each test starts
from clean emulators: stats, jobs and knobs reset (all latencies 0).
"""

from __future__ import annotations

import httpx
import pytest

from tests.emulators import EmulatorFleet


@pytest.fixture(scope="session")
def fleet():
    fleet = EmulatorFleet.start_in_thread()
    yield fleet
    fleet.stop_thread()


@pytest.fixture(autouse=True)
def clean(fleet):
    fleet.reset()
    yield


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client
