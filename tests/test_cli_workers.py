"""How many workers `serve` runs: one without REDIS_URL (state lives in that
process's memory), else one per CPU the process may run on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.cli import UnsharedStateError, choose_workers, default_workers

affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity (Linux)")


@affinity
def test_default_is_the_affinity_mask_size() -> None:
    assert default_workers() == len(os.sched_getaffinity(0))


@affinity
def test_a_process_pinned_to_one_cpu_gets_one_worker() -> None:
    """As in a container limited by cpuset or under `taskset -c 0`: the machine may have more."""
    cpu = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}}); from gateway.cli import default_workers; print(default_workers(), os.cpu_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0] == "1"


@pytest.mark.parametrize(
    ("requested", "shared", "allow_unshared", "workers"),
    [
        (None, False, False, 1),  # no Redis: one worker, whatever the CPUs
        (None, False, True, 1),  # the flag allows more, it does not ask for them
        (1, False, False, 1),
        (3, False, True, 3),  # the operator accepted per-worker state
        (3, True, False, 3),
        (None, True, False, "cpus"),  # with Redis: one per CPU
    ],
    ids=["default-memory", "default-memory-flag", "one-memory", "several-memory-flag", "several-redis", "default-redis"],
)
def test_the_worker_count_follows_where_state_is_shared(requested: int | None, shared: bool, allow_unshared: bool, workers: int | str) -> None:
    expected = default_workers() if workers == "cpus" else workers
    assert choose_workers(requested, shared=shared, allow_unshared=allow_unshared) == expected


def test_several_workers_without_redis_are_refused_naming_the_ways_out() -> None:
    with pytest.raises(UnsharedStateError) as refused:
        choose_workers(2, shared=False)
    assert "REDIS_URL" in str(refused.value) and "--allow-unshared-state" in str(refused.value)
