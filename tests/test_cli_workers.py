"""`serve --workers` defaults to the CPUs the process may run on, not the machine's count."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.cli import default_workers

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity (Linux)")


def test_default_is_the_affinity_mask_size() -> None:
    assert default_workers() == len(os.sched_getaffinity(0))


def test_a_process_pinned_to_one_cpu_gets_one_worker() -> None:
    """As in a container limited by cpuset or under `taskset -c 0`: the machine may have more."""
    cpu = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}}); from gateway.cli import default_workers; print(default_workers(), os.cpu_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0] == "1"
