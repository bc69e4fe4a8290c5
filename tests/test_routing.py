"""Routing policy: filters, order, tie-breaks, pin, preferences, price cap,
deadline spill, fallbacks, and the refusal for an empty plan."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import load_config
from gateway.dispatch.fleet import BackendFleet
from gateway.domain.capabilities import ELIGIBLE, Eligibility
from gateway.domain.errors import InvalidRequest, Unprocessable, UpstreamFailed
from gateway.domain.job import ImageJob, JobKind, ProviderPrefs
from gateway.health.view import HEALTHY, BreakerState, HealthView
from gateway.routing.plan import Candidate, Plan, Skip, SkipCause, plan, refusal
from gateway.routing.pricing import Quote
from tests.gateway_support import ENV, PROVIDERS_YAML


def job(**kw) -> ImageJob:
    return ImageJob(kind=JobKind.GENERATE, prompt="a fox", width=1024, height=1024, **kw)


def prefs(**kw) -> ProviderPrefs:
    if "max_price" in kw and kw["max_price"] is not None:
        kw["max_price"] = Decimal(kw["max_price"])
    return ProviderPrefs(**kw)


def cand(
    name: str,
    usd: str | None = "0.005",
    *,
    eligibility: Eligibility = ELIGIBLE,
    health: HealthView = HEALTHY,
    p50: float | None = None,
) -> Candidate:
    if p50 is not None:
        health = HealthView(**{**_fields(health), "latency_p50_s": p50})
    q = Quote(Decimal(usd), "per_image", "test") if usd is not None else None
    return Candidate(name, eligibility, q, health)


def _fields(h: HealthView) -> dict:
    return {f: getattr(h, f) for f in h.__dataclass_fields__}


def names(p: Plan) -> list[str]:
    return [c.name for c in p.attempts]


def skipped(p: Plan) -> dict[str, str]:
    return dict(p.skipped)


# The five default backends at 1024x1024, priced as the shipped sheets price them.
FLEET = (
    cand("fal", "0.00524288"),
    cand("replicate", "0.00104858"),
    cand("runflow", "0.01404858"),
    cand("empiriolabs", "0.0085"),
    cand("local", "0.00041506"),
)


# --- ordering -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        (FLEET, ["local", "replicate", "fal", "empiriolabs", "runflow"]),
        # equal prices: lower p50 latency first, unknown latency last
        ((cand("a", "0.001", p50=2.0), cand("b", "0.001", p50=0.5), cand("c", "0.001")), ["b", "a", "c"]),
        # equal price and latency: by name, whatever the input order
        ((cand("zeta", "0.001", p50=1.0), cand("alpha", "0.001", p50=1.0)), ["alpha", "zeta"]),
        # Decimal comparison, not float or string: 0.01 == 0.010 ties, 0.00104858 < 0.0010486
        ((cand("x", "0.010", p50=2.0), cand("y", "0.01", p50=1.0)), ["y", "x"]),
        ((cand("p", "0.0010486"), cand("q", "0.00104858")), ["q", "p"]),
        ((cand("s", "0.09"), cand("t", "0.1")), ["s", "t"]),
        # a backend without a quote goes after every priced one
        ((cand("unpriced", None), cand("dear", "9")), ["dear", "unpriced"]),
    ],
)
def test_cheapest_first_then_latency_then_name(candidates, expected):
    p = plan(job(), candidates)
    assert names(p) == expected
    assert p.chosen is p.attempts[0]
    assert p.skipped == ()


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (("runflow", "fal"), ["runflow", "fal", "local", "replicate", "empiriolabs"]),
        (("EmpirioLabs",), ["empiriolabs", "local", "replicate", "fal", "runflow"]),
        (("unknown", "fal"), ["fal", "local", "replicate", "empiriolabs", "runflow"]),
        ((), ["local", "replicate", "fal", "empiriolabs", "runflow"]),
    ],
)
def test_provider_order_comes_first_in_the_given_order(order, expected):
    assert names(plan(job(prefs=prefs(order=order)), FLEET)) == expected


def test_provider_order_does_not_resurrect_a_skipped_backend():
    down = HealthView(state=BreakerState.OPEN)
    p = plan(job(prefs=prefs(order=("fal",))), (cand("fal", health=down), cand("replicate", "0.001")))
    assert names(p) == ["replicate"]
    assert skipped(p) == {"fal": "circuit open"}


# --- filters ------------------------------------------------------------------


def test_ineligible_backends_are_skipped_with_the_eligibility_reason():
    cannot = Eligibility(False, "cannot produce exactly 1024x768", "size")
    p = plan(job(), (cand("replicate", "0.001", eligibility=cannot), cand("fal")))
    assert names(p) == ["fal"]
    assert skipped(p) == {"replicate": "cannot produce exactly 1024x768"}
    assert p.details[0].cause is SkipCause.INELIGIBLE


@pytest.mark.parametrize(
    ("health", "reason"),
    [
        (HealthView(state=BreakerState.OPEN), "circuit open"),
        (HealthView(parked_for_s=3.0), "rate limited for 3.0s"),
        (HealthView(credentials_invalid=True), "credentials rejected"),
    ],
)
def test_unavailable_backends_are_skipped_with_the_health_reason(health, reason):
    p = plan(job(), (cand("local", "0.0001", health=health), cand("fal")))
    assert names(p) == ["fal"]
    assert skipped(p) == {"local": reason}


def test_half_open_backend_is_still_tried():
    p = plan(job(), (cand("local", "0.0001", health=HealthView(state=BreakerState.HALF_OPEN)), cand("fal")))
    assert names(p) == ["local", "fal"]


@pytest.mark.parametrize(
    ("p", "kept", "dropped"),
    [
        (prefs(only=("fal", "runflow")), ["fal", "runflow"], {"local", "replicate", "empiriolabs"}),
        (prefs(only=("FAL",)), ["fal"], {"local", "replicate", "empiriolabs", "runflow"}),
        (prefs(ignore=("local", "replicate")), ["fal", "empiriolabs", "runflow"], {"local", "replicate"}),
        (prefs(only=("fal", "local"), ignore=("local",)), ["fal"], {"local", "replicate", "empiriolabs", "runflow"}),
    ],
)
def test_only_and_ignore_filter_backends(p, kept, dropped):
    result = plan(job(prefs=p), FLEET)
    assert names(result) == kept
    assert set(skipped(result)) == dropped
    assert {s.cause for s in result.details} == {SkipCause.PREFERENCE}


def test_pin_keeps_only_the_pinned_backend_and_overrides_preferences():
    p = plan(job(pinned_backend="runflow", prefs=prefs(ignore=("runflow",), order=("fal",))), FLEET)
    assert names(p) == ["runflow"]
    assert set(skipped(p)) == {"fal", "replicate", "empiriolabs", "local"}
    assert skipped(p)["fal"] == "request is pinned to runflow"


def test_pinned_backend_still_has_to_be_eligible():
    cannot = Eligibility(False, "at most 1,048,576 pixels per image", "size")
    p = plan(job(pinned_backend="empiriolabs"), (cand("empiriolabs", eligibility=cannot), cand("fal")))
    assert p.chosen is None
    err = refusal(p)
    assert isinstance(err, Unprocessable)
    assert err.status == 422 and err.code == "no_backend_supports_request"
    assert "empiriolabs: at most 1,048,576 pixels" in err.message
    assert err.param == "size"


@pytest.mark.parametrize(
    ("cap", "expected", "dropped"),
    [
        ("0.0085", ["local", "replicate", "fal", "empiriolabs"], {"runflow"}),  # equal to the cap passes
        ("0.005", ["local", "replicate"], {"fal", "empiriolabs", "runflow"}),
        ("1", ["local", "replicate", "fal", "empiriolabs", "runflow"], set()),
    ],
)
def test_max_price_drops_backends_quoting_above_it(cap, expected, dropped):
    p = plan(job(prefs=prefs(max_price=cap)), FLEET)
    assert names(p) == expected
    assert set(skipped(p)) == dropped


def test_max_price_reason_names_the_price_and_the_cap():
    p = plan(job(prefs=prefs(max_price="0.005")), FLEET)
    assert skipped(p)["runflow"] == "quoted $0.01404858 exceeds max_price $0.005"


def test_max_price_skips_a_backend_that_has_no_price():
    p = plan(job(prefs=prefs(max_price="1")), (cand("mystery", None), cand("fal")))
    assert names(p) == ["fal"]
    assert "max_price cannot be checked" in skipped(p)["mystery"]


@pytest.mark.parametrize(
    ("wait", "p50", "deadline", "spills"),
    [
        (100.0, None, 60.0, True),  # busy local GPU: spill to hosted backends
        (58.0, 3.0, 60.0, True),  # wait plus expected latency does not fit
        (10.0, 1.0, 60.0, False),
        (0.0, None, 1.0, False),
        (None, 20.0, 60.0, False),  # no queue figure: a latency within the deadline never drops
    ],
)
def test_queue_wait_beyond_the_deadline_spills_to_hosted_backends(wait, p50, deadline, spills):
    local = cand("local", "0.0004", health=HealthView(estimated_wait_s=wait, latency_p50_s=p50))
    p = plan(job(deadline_s=deadline), (local, cand("fal", "0.005")))
    if spills:
        assert names(p) == ["fal"]
        assert skipped(p)["local"].startswith(f"queue wait {wait:.1f}s exceeds the deadline")
    else:
        assert names(p) == ["local", "fal"]


@pytest.mark.parametrize(
    ("p50", "deadline", "kept"),
    [
        (3.0, 0.3, False),  # the case: a 300 ms deadline for a backend that takes 3 s
        (3.0, 2.9, False),
        (3.0, 3.0, True),  # just fits: tried
        (3.0, 30.0, True),
        (None, 0.3, True),  # unknown latency (nothing measured, no prior): allowed
        (0.0, 0.1, True),
    ],
)
def test_a_backend_expected_to_take_longer_than_the_deadline_is_skipped(p50, deadline, kept):
    p = plan(job(deadline_s=deadline), (cand("replicate", "0.001", p50=p50), cand("fal", "0.005", p50=0.05)))
    if kept:
        assert names(p) == ["replicate", "fal"]
    else:
        assert names(p) == ["fal"]
        (skip,) = p.details
        assert (skip.backend, skip.cause, skip.param, skip.expected_s) == ("replicate", SkipCause.TOO_SLOW, "x-klein-deadline-ms", p50)
        assert skip.reason == f"expected latency {p50:.1f}s exceeds the {deadline:g}s deadline"


@pytest.mark.parametrize(
    ("candidates", "status", "code"),
    [
        # every eligible backend too slow: 400, naming the fastest
        ((cand("replicate", p50=3.0), cand("fal", p50=1.5)), 400, "deadline_too_short"),
        # the others are out by preference, price or capability: still the deadline
        ((cand("replicate", p50=3.0), cand("fal", eligibility=Eligibility(False, "no edits", "image"))), 400, "deadline_too_short"),
        # one that could make it is down right now: a retry may help
        ((cand("replicate", p50=3.0), cand("fal", health=HealthView(state=BreakerState.OPEN))), 503, "no_backend_available"),
    ],
)
def test_a_deadline_no_eligible_backend_can_make_refuses_400(candidates, status, code):
    err = refusal(plan(job(deadline_s=1.0), candidates))
    assert (err.status, err.code) == (status, code)
    if code == "deadline_too_short":
        assert isinstance(err, InvalidRequest) and err.param == "x-klein-deadline-ms"
        fastest = min((c for c in candidates if c.eligibility.ok), key=lambda c: c.health.latency_p50_s)
        assert f"the fastest, {fastest.name}, is expected to take {fastest.health.latency_p50_s:.1f}s" in err.message
        assert err.headers()["x-should-retry"] == "false"


def test_without_fallbacks_only_the_first_attempt_is_kept():
    p = plan(job(prefs=prefs(allow_fallbacks=False)), FLEET)
    assert names(p) == ["local"]
    assert set(skipped(p)) == {"replicate", "fal", "empiriolabs", "runflow"}
    assert all("fallbacks disabled" in reason for reason in skipped(p).values())


@pytest.mark.parametrize(
    "j",
    [
        job(),
        job(prefs=prefs(only=("fal",), max_price="0.001")),
        job(pinned_backend="local", prefs=prefs(allow_fallbacks=False)),
        job(prefs=prefs(allow_fallbacks=False, ignore=("local",))),
    ],
)
def test_every_candidate_is_either_attempted_or_skipped_once(j):
    p = plan(j, FLEET)
    accounted = names(p) + [b for b, _ in p.skipped]
    assert sorted(accounted) == sorted(c.name for c in FLEET)
    assert [(s.backend, s.reason) for s in p.details] == list(p.skipped)


def test_plan_is_empty_not_an_error_when_nothing_is_left():
    p = plan(job(), ())
    assert p.attempts == () and p.chosen is None


# --- refusal ------------------------------------------------------------------


def test_all_unavailable_refuses_503_with_the_soonest_retry():
    p = plan(
        job(),
        (
            cand("fal", health=HealthView(parked_for_s=30.0)),
            cand("replicate", health=HealthView(parked_for_s=4.2)),
            cand("runflow", health=HealthView(state=BreakerState.OPEN)),
        ),
    )
    err = refusal(p)
    assert isinstance(err, UpstreamFailed)
    assert (err.status, err.code, err.retryable) == (503, "no_backend_available", True)
    assert err.headers()["retry-after"] == "4"
    assert "runflow: circuit open" in err.message


def test_busy_local_gpu_alone_refuses_503_retry_after_its_wait():
    local = cand("local", health=HealthView(estimated_wait_s=90.0))
    err = refusal(plan(job(deadline_s=30.0), (local,)))
    assert (err.status, err.code) == (503, "no_backend_available")
    assert err.retry_after == 90.0


def test_all_over_max_price_refuses_400_naming_the_cheapest_quote():
    err = refusal(plan(job(prefs=prefs(max_price="0.0001")), FLEET))
    assert isinstance(err, InvalidRequest)
    assert (err.status, err.code, err.param) == (400, "max_price_exceeded", "provider.max_price")
    assert "$0.00041506 (local)" in err.message and "$0.0001" in err.message
    assert err.headers()["x-should-retry"] == "false"


def test_price_cap_is_the_obstacle_when_the_rest_are_ineligible():
    cannot = Eligibility(False, "does not support edits", "image")
    candidates = (cand("runflow", "0.014"), cand("fal", "0.005", eligibility=cannot))
    err = refusal(plan(job(prefs=prefs(max_price="0.001")), candidates))
    assert err.code == "max_price_exceeded"
    assert "$0.014 (runflow)" in err.message


def test_an_unavailable_backend_makes_the_refusal_retryable_even_with_price_skips():
    candidates = (cand("runflow", "0.014"), cand("fal", "0.0001", health=HealthView(state=BreakerState.OPEN)))
    err = refusal(plan(job(prefs=prefs(max_price="0.001")), candidates))
    assert (err.status, err.code) == (503, "no_backend_available")


def test_all_ineligible_refuses_422_listing_every_reason():
    candidates = (
        cand("replicate", eligibility=Eligibility(False, "cannot produce exactly 1024x768", "size")),
        cand("empiriolabs", eligibility=Eligibility(False, "num_inference_steps must be 1 to 12", "num_inference_steps")),
    )
    err = refusal(plan(job(), candidates))
    assert isinstance(err, Unprocessable)
    assert (err.status, err.code, err.param) == (422, "no_backend_supports_request", None)
    assert "replicate: cannot produce exactly 1024x768" in err.message
    assert "empiriolabs: num_inference_steps must be 1 to 12" in err.message


def test_preferences_that_leave_nothing_refuse_400():
    err = refusal(plan(job(prefs=prefs(only=("nobody",))), FLEET))
    assert (err.status, err.code, err.param) == (400, "no_backend_matches_preferences", "provider")
    err = refusal(plan(job(pinned_backend="nobody"), FLEET))
    assert (err.code, err.param) == ("no_backend_matches_preferences", "model")


def test_no_backends_at_all_refuses_503():
    err = refusal(plan(job(), ()))
    assert (err.status, err.code, err.retryable) == (503, "no_backend_available", False)


def test_refusal_of_a_plan_built_by_hand_answers():
    err = refusal(Plan(attempts=(), details=(Skip("fal", "circuit open", SkipCause.UNAVAILABLE),)))
    assert (err.status, err.code) == (503, "no_backend_available")


def test_refusal_is_only_for_empty_plans():
    with pytest.raises(ValueError):
        refusal(plan(job(), FLEET))


# --- building candidates ------------------------------------------------------


async def test_fleet_candidates_price_with_the_sheet_and_prefer_a_reported_live_figure(tmp_path: Path):
    """The fleet builds what the router sees: sheet quotes, a live figure only
    from a backend whose adapter reports one (the local GPU), and eligibility
    from capabilities with providers.yaml overrides."""
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["backends"]["runflow"]["capabilities"] = {"max_n": 1}
    (tmp_path / "providers.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "providers.yaml", PROVIDERS_YAML.parent / "pricing", env=ENV)
    j = job(n=2)
    live = HealthView(live_usd_per_image=Decimal("0.0001"))
    async with httpx.AsyncClient() as client:
        fleet = BackendFleet(config, client, client)
        found = {c.name: c for c in fleet.candidates(j, {"fal": live, "local": live})}
    fal, local, runflow = found["fal"], found["local"], found["runflow"]
    assert fal.quote.usd == Decimal("0.01048576") and fal.eligibility.ok  # fal reports no live price: its sheet stands
    assert local.quote.usd == Decimal("0.00020972")  # 2 x 0.0001 x 1.048576
    assert runflow.eligibility.reason == "at most 1 images per request"
    assert names(plan(j, (fal, local, runflow))) == ["local", "fal"]


async def test_the_deadline_skip_uses_measured_latency_else_the_configured_prior():
    """Expected latency: the health view's recent p50; before any is measured,
    providers.yaml's expected_latency_s (replicate: 3 s); with neither, unknown (allowed)."""
    config = load_config(PROVIDERS_YAML, PROVIDERS_YAML.parent / "pricing", env=ENV)
    j = job(pinned_backend="replicate", deadline_s=2.0)
    async with httpx.AsyncClient() as client:
        fleet = BackendFleet(config, client, client)
        assert refusal(plan(j, fleet.candidates(j, {}))).code == "deadline_too_short"  # the prior, 3 s
        measured = {"replicate": HealthView(latency_p50_s=1.0, latency_p95_s=1.5)}
        assert names(plan(j, fleet.candidates(j, measured))) == ["replicate"]  # measured beats the prior
        fleet.backends["replicate"].expected_latency_s = None
        assert names(plan(j, fleet.candidates(j, {}))) == ["replicate"]  # nothing known: allowed
