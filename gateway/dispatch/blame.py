"""Whose fault a timeout is: the backend's, or the caller's short deadline's. Pure policy.

One caller with a deadline far below a backend's latency must not take that
backend away from everyone: if each of its timeouts counted, twenty such
requests would open the breaker for every tenant (issue 20). So a timed-out
attempt is judged by how long it was given:

- given at least the backend's expected latency (its recent p50, else the
  `expected_latency_s` prior of providers.yaml; UNKNOWN_EXPECTED_S when
  neither is known), the backend had its chance: the timeout is its failure,
  as before;
- given less, the caller's deadline cut it: the error is coded
  `caller_deadline`, which `health_effect` (gateway/health/tracker.py) gives
  no effect: no failure counted, no latency sampled (a cut attempt only says
  "took at least this long", a censored sample), and a half-open trial gives
  its slot back without closing or re-opening the breaker.

A timeout is a failure of class UNKNOWN_OUTCOME or UNREACHABLE that ended at
the attempt's deadline (within the timer slack). Anything else the backend
answered (a 5xx, a refusal, a rejection) is judged as before, whatever the
deadline. Billing does not change: an attempt cut after submitting is still
cancelled and counted as possibly billed by dispatch.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.health.view import HealthView
from gateway.providers.base import CALLER_DEADLINE, GATEWAY_OVERLOADED, FailureClass, ProviderError

UNKNOWN_EXPECTED_S = 5.0  # with no latency known, an attempt given this long had its chance
TIMEOUTS = frozenset({FailureClass.UNKNOWN_OUTCOME, FailureClass.UNREACHABLE})


def expected_latency(view: HealthView) -> float | None:
    """The backend's expected answer time: recent p50 (the fleet puts the configured prior there before any is measured)."""
    return view.latency_p50_s


def cut_by_caller(failure: FailureClass, *, given_s: float, ran_out: bool, expected_s: float | None) -> bool:
    """True when a timeout happened in an attempt given less than the backend's expected time."""
    if not ran_out or failure not in TIMEOUTS:
        return False
    return given_s < (expected_s if expected_s is not None else UNKNOWN_EXPECTED_S)


def judged(err: ProviderError, *, given_s: float, ran_out: bool, expected_s: float | None) -> ProviderError:
    """`err`, coded `caller_deadline` when the caller's deadline cut the attempt (see `cut_by_caller`)."""
    if err.code == GATEWAY_OVERLOADED:
        return err  # already not the backend's failure, and retried on it (gateway/dispatch/overload.py)
    if not cut_by_caller(err.failure, given_s=given_s, ran_out=ran_out, expected_s=expected_s):
        return err
    return replace(err, code=CALLER_DEADLINE)
