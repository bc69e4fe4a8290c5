"""Provider emulators: each provider's protocol, served for real on 127.0.0.1.

fal (queue), Replicate (predictions), Runflow (runs), EmpirioLabs (sync,
OpenAI-like) and the local backend (local_backend/schemas.py), each an ASGI
app that checks its key, returns real Pillow images of the requested size
and format, and injects latency and faults on demand (`EmulatorKnobs`,
changeable at run time under `/_admin/`). `EmulatorFleet` runs them all
with uvicorn; `fleet.env()` points the gateway at them. See README.md here.
"""

from tests.emulators.core import EmulatorApp, Stats
from tests.emulators.knobs import FAULT_KINDS, EmulatorKnobs, Faults, JobTiming, Latency, LocalBackend
from tests.emulators.launcher import PROVIDERS, EmulatorFleet, RunningEmulator, build_app

__all__ = [
    "FAULT_KINDS",
    "PROVIDERS",
    "EmulatorApp",
    "EmulatorFleet",
    "EmulatorKnobs",
    "Faults",
    "JobTiming",
    "Latency",
    "LocalBackend",
    "RunningEmulator",
    "Stats",
    "build_app",
]
