"""Which timeouts count against a backend's health (gateway/dispatch/blame.py).

A timeout the caller's own short deadline caused is not the backend's
failure: it neither counts, nor samples latency, nor moves a half-open
breaker (whose trial slot is given back). A timeout after the backend had
at least its expected time is its failure, as before.
"""

from __future__ import annotations

import pytest

from gateway.dispatch.blame import UNKNOWN_EXPECTED_S, cut_by_caller, expected_latency, judged
from gateway.health.tracker import BreakerPolicy, HealthTracker, health_effect
from gateway.health.view import BreakerState, HealthView
from gateway.providers.base import CALLER_DEADLINE, GATEWAY_OVERLOADED, FailureClass, ProviderError
from gateway.state import MemoryStore

F = FailureClass
POLICY = BreakerPolicy(window_s=60, min_requests=4, consecutive_failures=3, cooldown_s=5, cooldown_max_s=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("failure", "given_s", "ran_out", "expected_s", "caller"),
    [
        # the case: 0.3 s given to a backend that takes 3 s
        pytest.param(F.UNKNOWN_OUTCOME, 0.3, True, 3.0, True, id="short-deadline-submitted"),
        pytest.param(F.UNREACHABLE, 0.3, True, 3.0, True, id="short-deadline-before-connect"),
        # nothing known of the backend: a short attempt is the caller's, a long one the backend's
        pytest.param(F.UNKNOWN_OUTCOME, 0.3, True, None, True, id="unknown-latency-short"),
        pytest.param(F.UNKNOWN_OUTCOME, UNKNOWN_EXPECTED_S, True, None, False, id="unknown-latency-long-enough"),
        # given at least its expected time: the backend's failure, as before
        pytest.param(F.UNKNOWN_OUTCOME, 3.0, True, 3.0, False, id="given-exactly-expected"),
        pytest.param(F.UNKNOWN_OUTCOME, 10.0, True, 3.0, False, id="given-plenty-hung"),
        pytest.param(F.UNREACHABLE, 10.0, True, 3.0, False, id="given-plenty-unreachable"),
        # not a timeout: ended before its deadline, or an answer of the backend's
        pytest.param(F.UNKNOWN_OUTCOME, 0.3, False, 3.0, False, id="reset-before-the-deadline"),
        pytest.param(F.FAILED, 0.3, True, 3.0, False, id="5xx-at-the-deadline"),
        pytest.param(F.REFUSED, 0.3, True, 3.0, False, id="refused"),
        pytest.param(F.REJECTED, 0.3, True, 3.0, False, id="rejected"),
        pytest.param(F.DELIVERY_FAILED, 0.3, True, 3.0, False, id="delivery"),
    ],
)
def test_which_timeouts_are_the_callers(failure: FailureClass, given_s: float, ran_out: bool, expected_s: float | None, caller: bool) -> None:
    assert cut_by_caller(failure, given_s=given_s, ran_out=ran_out, expected_s=expected_s) is caller
    err = judged(ProviderError(failure, "x", status=500 if failure is F.FAILED else None), given_s=given_s, ran_out=ran_out, expected_s=expected_s)
    assert (err.code == CALLER_DEADLINE) is caller
    if caller:
        assert not health_effect(err).counts_as_failure
    else:
        assert health_effect(err) == health_effect(ProviderError(failure, "x", status=err.status))  # judged as before


def test_a_caller_cut_timeout_has_no_health_effect_and_overload_keeps_its_code() -> None:
    cut = judged(ProviderError(F.UNKNOWN_OUTCOME, "t", job_id="p1", billed=True), given_s=0.3, ran_out=True, expected_s=3.0)
    assert cut.code == CALLER_DEADLINE and cut.job_id == "p1" and cut.billed  # billing is untouched
    effect = health_effect(cut)
    assert not effect.counts_as_failure and effect.park_s is None and not effect.mark_credentials_invalid
    overloaded = ProviderError(F.UNREACHABLE, "busy", code=GATEWAY_OVERLOADED)
    assert judged(overloaded, given_s=0.3, ran_out=True, expected_s=3.0) is overloaded


def test_expected_latency_is_the_views_p50() -> None:
    assert expected_latency(HealthView(latency_p50_s=2.5, latency_p95_s=9.0)) == 2.5
    assert expected_latency(HealthView()) is None


def _cut() -> ProviderError:
    return judged(ProviderError(F.UNKNOWN_OUTCOME, "t", job_id="p", billed=True), given_s=0.3, ran_out=True, expected_s=3.0)


async def test_twenty_caller_cut_timeouts_leave_the_breaker_closed_and_sample_no_latency() -> None:
    tracker = HealthTracker(MemoryStore(), {"b": POLICY}, {"b": "replicate"}, clock=Clock())
    for _ in range(20):
        admission = await tracker.acquire("b")
        assert admission is not None
        await tracker.record_failure("b", _cut(), 0.3, admission)
    view = (await tracker.views(["b"]))["b"]
    assert view.state is BreakerState.CLOSED and view.error_rate == 0.0
    assert view.latency_p50_s is None  # 0.3 s is not an answer time
    described = (await tracker.describe(["b"]))["b"]
    assert described["window"]["failures"] == 0 and described["failures_in_row"] == 0 and described["latency_samples"] == 0


async def test_the_backends_own_timeouts_still_open_it() -> None:
    tracker = HealthTracker(MemoryStore(), {"b": POLICY}, {"b": "replicate"}, clock=Clock())
    hung = judged(ProviderError(F.UNKNOWN_OUTCOME, "t", job_id="p", billed=True), given_s=10.0, ran_out=True, expected_s=3.0)
    for _ in range(3):
        await tracker.record_failure("b", hung, 10.0)
    assert (await tracker.views(["b"]))["b"].state is BreakerState.OPEN


async def test_a_half_open_trial_cut_by_the_callers_deadline_frees_its_slot_and_moves_nothing() -> None:
    clock = Clock()
    tracker = HealthTracker(MemoryStore(), {"b": POLICY}, {"b": "replicate"}, clock=clock)
    for _ in range(3):
        await tracker.record_failure("b", ProviderError(F.FAILED, "HTTP 500", status=500))
    clock.now += POLICY.cooldown_s
    trial = await tracker.acquire("b")
    assert trial is not None and trial.lease is not None
    assert await tracker.acquire("b") is None  # one trial at a time
    await tracker.record_failure("b", _cut(), 0.3, trial)
    assert (await tracker.views(["b"]))["b"].state is BreakerState.HALF_OPEN  # neither closed nor re-opened
    assert trial.lease.returned
    again = await tracker.acquire("b")  # the slot is free for the next trial
    assert again is not None and again.lease is not None
    await tracker.record_success("b", 3.0, again)
    assert (await tracker.views(["b"]))["b"].state is BreakerState.CLOSED
