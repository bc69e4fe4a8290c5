"""Routing by price and failover by failure class, through the real HTTP app.

Adapters are scripted fakes; capabilities, price sheets, routing, dispatch,
result shaping and the error envelope are the real ones.
"""

from __future__ import annotations

import base64
from decimal import Decimal

import pytest
from litestar.testing import AsyncTestClient

from gateway.providers.base import FailureClass, ProviderError
from tests.gateway_support import SECRETS, FakeAdapter, image_size_of, install_fakes, make_app

# At 1024x1024 text-to-image the shipped sheets order the backends:
# local 0.000415.. < replicate 0.00104858 < fal 0.00524288 < empiriolabs 0.0085 < runflow 0.01404858
PRICE_ORDER = ["local", "replicate", "fal", "empiriolabs", "runflow"]
BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "b64_json"}


def fakes(**scripts: list[ProviderError | str]) -> dict[str, FakeAdapter]:
    return {name: FakeAdapter(name, scripts.get(name, ["ok"])) for name in PRICE_ORDER}


@pytest.fixture
async def client_and_fakes(request: pytest.FixtureRequest):
    scripts = getattr(request, "param", {})
    app = make_app()
    f = fakes(**scripts)
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        yield client, f, app


async def test_cheapest_eligible_backend_serves_the_request(client_and_fakes):
    client, f, _ = client_and_fakes
    resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "local"
    assert resp.headers["x-klein-attempts"] == "1"
    assert len(f["local"].calls) == 1 and not f["replicate"].calls
    data = resp.json()["data"]
    assert image_size_of(base64.b64decode(data[0]["b64_json"])) == (1024, 1024)


async def test_size_replicate_cannot_make_exactly_skips_it(client_and_fakes):
    client, f, app = client_and_fakes
    app.state.gateway.fleet.backends.pop("local")
    resp = await client.post("/v1/images/generations", json={**BODY, "size": "1024x768"})
    assert resp.status_code == 200, resp.text
    # replicate only makes its published (aspect ratio, 1 MP) sizes; fal is next cheapest
    assert resp.headers["x-klein-backend"] == "fal"
    assert not f["replicate"].calls


FAILURES = [
    ("server_error", ProviderError(FailureClass.FAILED, "HTTP 500: boom", status=500)),
    ("timeout_after_submit", ProviderError(FailureClass.UNKNOWN_OUTCOME, "timed out", job_id="j-1", billed=True)),
    ("rate_limited", ProviderError(FailureClass.REFUSED, "HTTP 429: slow down", status=429, retry_after=3)),
    ("connect_error", ProviderError(FailureClass.UNREACHABLE, "could not connect: ConnectError")),
    ("garbage_body", ProviderError(FailureClass.FAILED, "HTTP 200: response body is not JSON", status=200)),
    ("bad_credentials", ProviderError(FailureClass.REFUSED, "HTTP 401: bad key", status=401, credentials_invalid=True)),
]


@pytest.mark.parametrize("label,error", FAILURES, ids=[f[0] for f in FAILURES])
async def test_cheapest_failing_fails_over_to_next_cheapest(label, error):
    app = make_app()
    f = fakes(local=[error])
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "replicate"
    assert resp.headers["x-klein-attempts"] == "2"
    assert len(f["local"].calls) == 1 and len(f["replicate"].calls) == 1


async def test_unknown_outcome_cancels_the_job_and_a_confirmed_cancel_is_not_charged():
    app = make_app()
    f = fakes(local=[ProviderError(FailureClass.UNKNOWN_OUTCOME, "timed out", job_id="job-42", billed=True)])
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert f["local"].cancelled == ["job-42"]  # waited for, not fired and forgotten
    assert resp.status_code == 200
    gw = app.state.gateway
    assert Decimal(resp.headers["x-klein-cost-usd"]) == Decimal("0.00104858")  # replicate's image only
    assert "x-klein-possibly-billed-usd" not in resp.headers
    assert gw.metrics.registry.get_sample_value("klein_possible_double_spend_total", {"backend": "replicate"}) == 0


async def test_every_backend_failing_gives_502_envelope_with_attempts_and_no_secrets():
    app = make_app()
    err = ProviderError(FailureClass.FAILED, "HTTP 500: upstream exploded", status=500)
    f = fakes(**{name: [err] for name in PRICE_ORDER})
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 502
    body = resp.json()["error"]
    assert body["type"] == "server_error" and body["code"] == "all_backends_failed"
    assert [a["backend"] for a in body["attempts"]] == PRICE_ORDER
    assert resp.headers["x-klein-attempts"] == "5"
    for secret in SECRETS.values():
        assert secret not in resp.text


async def test_rejected_everywhere_gives_422_and_no_retry():
    app = make_app()
    err = ProviderError(FailureClass.REJECTED, "HTTP 422: prompt rejected", status=422)
    install_fakes(app, fakes(**{name: [err] for name in PRICE_ORDER}))
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 422
    assert resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["code"] == "rejected_by_backends"


async def test_content_filtered_is_reported_without_failover():
    app = make_app()
    f = fakes(local=[ProviderError(FailureClass.CONTENT_FILTERED, "all images flagged", billed=True)])
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "content_policy_violation"
    assert not f["replicate"].calls
    assert Decimal(resp.headers["x-klein-cost-usd"]) > 0


ROUTING_CASES = [
    ("pin_by_model_prefix", {"model": "fal/flux-2-klein-4b"}, "fal"),
    ("alias_does_not_pin", {"model": "black-forest-labs/flux-2-klein-4b"}, "local"),
    ("provider_only", {"provider": {"only": ["empiriolabs", "runflow"]}}, "empiriolabs"),
    ("provider_ignore", {"provider": {"ignore": ["local", "replicate"]}}, "fal"),
    ("provider_order_first", {"provider": {"order": ["runflow"]}}, "runflow"),
    ("max_price_keeps_cheap", {"provider": {"max_price": "0.002", "ignore": ["local"]}}, "replicate"),
]


@pytest.mark.parametrize("label,extra,expected", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
async def test_routing_preferences_choose_the_backend(client_and_fakes, label, extra, expected):
    client, _, _ = client_and_fakes
    resp = await client.post("/v1/images/generations", json={**BODY, **extra})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == expected


async def test_max_price_below_every_backend_is_refused_clearly(client_and_fakes):
    client, f, _ = client_and_fakes
    resp = await client.post("/v1/images/generations", json={**BODY, "provider": {"max_price": "0.0001"}})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "max_price_exceeded"
    assert "0.0001" in err["message"]
    assert not any(fake.calls for fake in f.values())


async def test_allow_fallbacks_false_stops_after_first_failure():
    app = make_app()
    f = fakes(local=[ProviderError(FailureClass.FAILED, "HTTP 500", status=500)])
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json={**BODY, "provider": {"allow_fallbacks": False}})
    assert resp.status_code == 502
    assert not f["replicate"].calls


async def test_url_response_for_bytes_is_served_from_a_signed_url(client_and_fakes):
    client, _, _ = client_and_fakes
    resp = await client.post("/v1/images/generations", json={**BODY, "response_format": "url", "output_format": "webp", "n": 2})
    assert resp.status_code == 200, resp.text
    urls = [d["url"] for d in resp.json()["data"]]
    assert len(urls) == 2
    for url in urls:
        path = url.split("://", 1)[1].split("/", 1)[1]
        img = await client.get("/" + path)
        assert img.status_code == 200
        assert img.headers["content-type"] == "image/webp"
        assert image_size_of(img.content) == (1024, 1024)
    tampered = "/" + urls[0].split("://", 1)[1].split("/", 1)[1].replace("sig=", "sig=0")
    assert (await client.get(tampered)).status_code == 404


async def test_deadline_header_bounds_the_whole_request():
    app = make_app()
    slow = {name: FakeAdapter(name, ["ok"], delay_s=5.0) for name in PRICE_ORDER}
    install_fakes(app, slow)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "1000"})  # local's prior, 0.8 s, fits
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "deadline_exceeded"


async def test_a_deadline_shorter_than_every_backends_expected_latency_is_refused_before_any_call():
    """The shipped priors (expected_latency_s) stand in before any latency is measured: the fastest is local's 0.8 s."""
    app = make_app()
    fakes = {name: FakeAdapter(name, ["ok"]) for name in PRICE_ORDER}
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "300"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "deadline_too_short", "x-klein-deadline-ms")
    assert "the fastest, local, is expected to take 0.8s" in error["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert all(not f.calls for f in fakes.values())


@pytest.mark.parametrize(
    "remaining,last,expected",
    [(120.0, False, 60.0), (8.0, False, 5.0), (6.0, False, 4.2), (3.0, False, 2.1), (3.0, True, 3.0), (0.5, False, 0.35)],
)
def test_attempt_budget_keeps_a_share_of_the_deadline_for_the_next_backend(remaining, last, expected):
    from gateway.dispatch.attempts import attempt_budget

    assert attempt_budget(remaining, last) == pytest.approx(expected)


async def test_hung_cheapest_backend_leaves_time_for_the_next_within_a_short_deadline():
    app = make_app()
    f = fakes()
    f["local"] = FakeAdapter("local", ["ok"], delay_s=30.0)
    install_fakes(app, f)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "3000"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "replicate"


async def test_requests_beyond_the_in_flight_cap_get_503_with_retry_after_at_once():
    import asyncio

    app = make_app()
    gw = app.state.gateway
    gw.config.settings.max_in_flight = 2
    slow = fakes()
    slow["local"] = FakeAdapter("local", ["ok"], delay_s=0.5)
    install_fakes(app, slow)
    import httpx

    from tests.gateway_support import ServerThread

    # Over a real socket: the test client does not interleave concurrent requests.
    with ServerThread(app) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            responses = await asyncio.gather(*(client.post("/v1/images/generations", json=BODY) for _ in range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.json()["error"]["code"] == "gateway_busy" and r.headers["retry-after"] == "1" for r in busy)
    assert gw.in_flight == 0
