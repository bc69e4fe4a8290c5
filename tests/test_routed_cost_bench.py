"""The routed-cost benchmark's core on a small workload: routing spends what
an independent oracle says is the minimum, wherever the cheapest backend is up."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "routed_cost.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("routed_cost", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("public_url", [True, False], ids=["public-url", "no-public-url"])
def test_routing_equals_the_oracle_minimum_on_every_job_when_all_backends_are_up(bench: ModuleType, public_url: bool) -> None:
    fleet = bench.build_fleet(with_local=False, public_url=public_url)
    jobs = bench.parse_jobs(fleet, bench.workload(80, seed=3))
    result = bench.run(fleet, jobs, [frozenset()] * len(jobs), "healthy", with_local=False)
    assert result.defects == [] and result.misses == []
    assert result.routed == result.oracle > 0
    assert result.routed < result.fal_only
    # the workload exercises what the oracle has to get right
    assert any(not j.size_intent.exact for j in jobs) and any(any(r.url is None for r in j.references) for j in jobs)
    assert result.by_backend.get("replicate", 0) > 0
    assert (result.by_backend.get("empiriolabs", 0) > 0) or not public_url


def test_under_outages_every_miss_is_a_cheapest_backend_that_was_down(bench: ModuleType) -> None:
    fleet = bench.build_fleet(with_local=True, public_url=True)
    jobs = bench.parse_jobs(fleet, bench.workload(60, seed=11))
    down = bench.outages(len(jobs), sorted(fleet.backends), 0.3, seed=11)
    result = bench.run(fleet, jobs, down, "outages", with_local=True)
    assert result.defects == []
    assert result.misses, "a 30% outage rate should take the cheapest backend down for some job"
    assert all("was down" in m or "no backend was routed" in m for m in result.misses)


def test_the_oracle_catches_a_router_that_ignores_native_sizes(bench: ModuleType) -> None:
    """With native sizes switched off in the gateway, the oracle (which keeps them)
    reports the 16:9 request routed to fal as a defect: the comparison can fail."""
    fleet = bench.build_fleet(with_local=False, public_url=True, native_sizes=False)
    jobs = bench.parse_jobs(fleet, [({"prompt": "p", "aspect_ratio": "16:9"}, [])])
    result = bench.run(fleet, jobs, [frozenset()], "exact only", with_local=False)
    assert result.by_backend == {"fal": 1}
    assert len(result.defects) == 1 and "replicate was up at $0.00104832" in result.defects[0]
    assert result.oracle == Decimal("0.00104832")
