"""Dispatch on the unhappy path, through the real app with scripted adapters.

- "Submitted, outcome unknown": the cancel's answer decides whether to fail
  over and whether the attempt is reported as billed, possibly billed or free.
- An adapter raising an exception type it should not (httpx.InvalidURL, a
  ValueError from a bad port, ...) fails over; the request lives.
- Failures after a successful generation are `delivery_failed`: billed once,
  counted as double spend when bought again elsewhere, and held against the
  backend only when the provider's images were at fault.
- A request cancelled while its outcome is being recorded gives its
  half-open trial lease back.
- Savings are compared only where the baseline backend could have served.
- The attempt budget gives a healthy slow backend the time it needs.
- A connect that failed while the gateway's own loop ran late is retried on
  the same backend and never counted against it.

Image downloads go through an httpx mock transport (respx) at the wire.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from gateway.dispatch import delivery as results
from gateway.dispatch.attempts import OVERLOAD_RETRIES, attempt_budget, needed_time
from gateway.domain.job import ImageJob, JobKind
from gateway.health.breaker import BreakerRecord
from gateway.health.view import BreakerState, HealthView
from gateway.providers.base import (
    AdapterSettings,
    FailureClass,
    GeneratedImage,
    ProviderError,
    ProviderResult,
    Timeouts,
)
from gateway.state.memory import MemoryStore
from tests.gateway_support import FakeAdapter, image_size_of, install_fakes, make_app, png_bytes

PRICE_ORDER = ["local", "replicate", "fal", "empiriolabs", "runflow"]  # at 1024x1024
BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "b64_json"}
REPLICATE_USD = Decimal("0.00104858")
LOCAL_USD = Decimal("0.00041506")  # the local sheet at 1024x1024: 2.50/3600 x 0.57 x 1.048576


def sample(app, name: str, labels: dict[str, str]) -> float:
    return app.state.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


class CancellingFake(FakeAdapter):
    """A fake whose cancel answers as scripted: True, False, None, or "hang"."""

    def __init__(self, name: str, outcomes: list, cancel_answer: bool | str | None) -> None:
        super().__init__(name, outcomes)
        self.cancel_answer = cancel_answer

    async def cancel(self, job_id: str) -> bool | None:
        self.cancelled.append(job_id)
        if self.cancel_answer == "hang":
            await asyncio.sleep(30)
        return self.cancel_answer  # type: ignore[return-value]


UNKNOWN = ProviderError(FailureClass.UNKNOWN_OUTCOME, "timed out following job", job_id="job-7", billed=True)
UNKNOWN_NO_ID = ProviderError(FailureClass.UNKNOWN_OUTCOME, "timed out waiting for the provider", billed=True)


@pytest.mark.parametrize(
    ("error", "cancel_answer", "status", "possibly_billed", "double_spend"),
    [
        pytest.param(UNKNOWN, True, 200, False, 0, id="cancel-confirmed-fails-over-free"),
        pytest.param(UNKNOWN, None, 200, True, 1, id="no-cancel-fails-over-possibly-billed"),
        pytest.param(UNKNOWN_NO_ID, True, 200, True, 1, id="no-job-id-fails-over-possibly-billed"),
        pytest.param(UNKNOWN, False, 502, True, 0, id="cancel-refused-stops"),
        pytest.param(UNKNOWN, "hang", 502, True, 0, id="cancel-unanswered-stops"),
    ],
)
async def test_unknown_outcome_table(error, cancel_answer, status, possibly_billed, double_spend) -> None:
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = CancellingFake("local", [error], cancel_answer)
    install_fakes(app, fakes)
    local_quote = app.state.gateway.fleet.backends["local"].quote(ImageJob(JobKind.GENERATE, "x", 1024, 1024)).usd
    t0 = time.monotonic()
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "10000"})
    elapsed = time.monotonic() - t0
    assert resp.status_code == status, resp.text
    assert fakes["local"].cancelled == (["job-7"] if error.job_id else [])
    possibly = resp.headers.get("x-klein-possibly-billed-usd")
    assert (Decimal(possibly) if possibly else Decimal(0)) == (local_quote if possibly_billed else 0)
    assert sample(app, "klein_possibly_billed_usd_total", {"backend": "local"}) == pytest.approx(float(local_quote) if possibly_billed else 0)
    assert sample(app, "klein_possible_double_spend_total", {"backend": "replicate"}) == double_spend
    if status == 200:
        assert resp.headers["x-klein-backend"] == "replicate"
        assert Decimal(resp.headers["x-klein-cost-usd"]) == REPLICATE_USD  # surely billed: the delivered image only
    else:
        assert resp.json()["error"]["code"] == "outcome_unknown"
        assert resp.headers["x-klein-cost-usd"] == "0"
        assert not fakes["replicate"].calls  # never bought twice
        assert elapsed < 3.0 + 0.5  # an unanswered cancel is waited for at most CANCEL_TIMEOUT_S


class RaisingFake(FakeAdapter):
    def __init__(self, name: str, exc: Exception) -> None:
        super().__init__(name)
        self.exc = exc

    async def generate(self, job, deadline):
        self.calls.append(job)
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(httpx.InvalidURL("Invalid port: '99999'"), id="httpx-invalid-url"),
        pytest.param(ValueError("Port out of range 0-65535"), id="value-error-bad-port"),
        pytest.param(KeyError("output"), id="key-error"),
        pytest.param(RuntimeError("boom"), id="runtime-error"),
    ],
)
async def test_an_adapter_raising_an_unexpected_type_fails_over(exc: Exception) -> None:
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = RaisingFake("local", exc)
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "replicate"
    assert sample(app, "klein_upstream_attempts_total", {"backend": "local", "outcome": "failed"}) == 1


# ---- failures after a successful generation --------------------------------------

CDN = "https://cdn.provider.test/out/0.png"


class UrlFake(FakeAdapter):
    """Generates fine and answers with an image URL (or `images` as given)."""

    def __init__(self, name: str, images: list[GeneratedImage] | None = None, cost: Decimal | None = None) -> None:
        super().__init__(name)
        self.images = images
        self.cost = cost

    async def generate(self, job, deadline):
        self.calls.append(job)
        images = self.images if self.images is not None else [GeneratedImage(url=CDN, content_type="image/png")]
        return ProviderResult(images=images, reported_cost_usd=self.cost)


DELIVERY_CASES = [
    # (id, download answer, images the provider returned, counts against health)
    pytest.param(httpx.ConnectError("connection refused"), None, False, id="download-connect-error-not-counted"),
    pytest.param(httpx.ReadTimeout("slow cdn"), None, False, id="download-timeout-not-counted"),
    pytest.param(httpx.Response(500), None, True, id="download-http-500"),
    pytest.param(httpx.Response(200, content=png_bytes(512, 512)), None, True, id="wrong-size"),
    pytest.param(httpx.Response(200, content=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), None, True, id="undecodable"),
    pytest.param(None, [], True, id="too-few-images"),
]


@pytest.mark.parametrize(("answer", "images", "counts"), DELIVERY_CASES)
async def test_a_delivery_failure_is_billed_once_counted_and_bought_again_as_double_spend(answer, images, counts) -> None:
    router = respx.Router(assert_all_called=False)
    if answer is not None:
        route = router.get(CDN)
        route.side_effect = answer if isinstance(answer, Exception) else None
        if not isinstance(answer, Exception):
            route.return_value = answer
    app = make_app(transport=httpx.MockTransport(router.async_handler))
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = UrlFake("local", images, cost=Decimal("0.0004"))
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
        health = (await client.get("/v1/backends")).json()
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "replicate"
    # each attempt billed once, by the sheet's figure (a provider's own travels beside it as billed)
    assert Decimal(resp.headers["x-klein-cost-usd"]) == LOCAL_USD + REPLICATE_USD
    assert sample(app, "klein_upstream_attempts_total", {"backend": "local", "outcome": "delivery_failed"}) == 1
    assert sample(app, "klein_failovers_total", {"from_backend": "local", "reason": "delivery_failed"}) == 1
    assert sample(app, "klein_possible_double_spend_total", {"backend": "replicate"}) == 1
    local = next(row for row in health["data"] if row["name"] == "local")
    assert local["window"]["failures"] == (1 if counts else 0)


async def test_a_download_is_streamed_and_stopped_at_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "MAX_OUTPUT_BYTES", 64 * 1024)
    pulled = []

    async def endless():
        for i in range(10_000):
            pulled.append(i)
            yield b"\x00" * 4096

    router = respx.Router(assert_all_called=False)
    router.get(CDN).mock(side_effect=lambda request: httpx.Response(200, content=endless()))
    app = make_app(transport=httpx.MockTransport(router.async_handler))
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = UrlFake("local")
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 200 and resp.headers["x-klein-backend"] == "replicate"
    assert len(pulled) <= 64 * 1024 // 4096 + 2  # stopped at the cap, not read whole


# ---- trial leases survive a cancelled request --------------------------------------


class BlockingStore(MemoryStore):
    """Memory, except that `incr` waits for `gate` while it is armed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.armed = False
        self.waiting = asyncio.Event()

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float) -> int:
        if self.armed:
            self.waiting.set()
            await self.gate.wait()
        return await super().incr(key, amount, ttl_s=ttl_s)


async def test_a_request_cancelled_while_its_outcome_is_recorded_gives_its_trial_lease_back() -> None:
    app = make_app()
    gw = app.state.gateway
    store = BlockingStore()
    gw.health.store = store
    gw.health._trials._store = store
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = FakeAdapter("local", [ProviderError(FailureClass.FAILED, "HTTP 500", status=500)])
    install_fakes(app, fakes)
    half_open = BreakerRecord(state=BreakerState.OPEN, since=time.time() - 3600, cooldown_s=5.0, version=3)
    await store.set("health:local:breaker", half_open.encode(), ttl_s=3600)
    job = ImageJob(JobKind.GENERATE, "a lighthouse", 1024, 1024, response_format="b64_json", pinned_backend="local", deadline_s=30)
    store.armed = True
    task = asyncio.create_task(gw.images(job, started=time.monotonic(), base_url="http://gw.test"))
    await asyncio.wait_for(store.waiting.wait(), 5)  # recording the trial's failure, holding the lease
    assert await gw.health.acquire("local") is None  # the trial runs: nobody else gets in
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.armed = False
    await asyncio.sleep(0.05)  # the shielded release
    assert await gw.health.acquire("local") is not None, "the cancelled request kept its trial lease"


# ---- savings baseline ----------------------------------------------------------


async def test_savings_are_only_compared_where_the_baseline_backend_could_have_served() -> None:
    app = make_app()
    install_fakes(app, {n: FakeAdapter(n) for n in PRICE_ORDER})
    fal = app.state.gateway.fleet.backends["fal"]
    fal.capabilities = dataclasses.replace(fal.capabilities, max_n=1)  # the baseline makes one image per request
    async with AsyncTestClient(app) as client:
        one = await client.post("/v1/images/generations", json=BODY)
        baseline_after_one = sample(app, "klein_baseline_cost_usd_total", {"backend": "local"})
        two = await client.post("/v1/images/generations", json={**BODY, "n": 2})
    assert one.status_code == two.status_code == 200
    assert one.headers["x-klein-backend"] == two.headers["x-klein-backend"] == "local"
    assert baseline_after_one > 0
    assert sample(app, "klein_baseline_cost_usd_total", {"backend": "local"}) == baseline_after_one


# ---- the attempt budget ----------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "last", "needs", "want"),
    [
        (60.0, False, None, 30.0),  # half of what is left
        (8.0, False, None, 5.0),  # at least MIN_ATTEMPT_S...
        (4.0, False, None, 2.8),  # ...but the fallback reserve is kept
        (60.0, False, 45.0, 45.0),  # a healthy slow backend gets what its latency needs
        (60.0, False, 20.0, 30.0),  # needing less than the default changes nothing
        (40.0, False, 50.0, 20.0),  # needing more than is left: the default share
        (10.0, True, None, 10.0),  # the last backend gets everything
    ],
)
def test_attempt_budget_table(remaining: float, last: bool, needs: float | None, want: float) -> None:
    assert attempt_budget(remaining, last, needs) == pytest.approx(want)


@pytest.mark.parametrize(
    ("view", "want"),
    [
        (HealthView(latency_p95_s=8.0), 10.0),
        (HealthView(latency_p95_s=8.0, error_rate=0.5), None),  # sick, not slow: no extra time
        (HealthView(state=BreakerState.HALF_OPEN, latency_p95_s=8.0), None),
        (HealthView(latency_p95_s=None), None),
    ],
)
def test_only_a_healthy_backend_is_given_the_time_its_latency_needs(view: HealthView, want: float | None) -> None:
    assert needed_time(view) == (pytest.approx(want) if want is not None else None)


async def test_a_healthy_slow_cheapest_backend_is_waited_for_instead_of_abandoned() -> None:
    """The local backend answers in 3.2 s; with a 4.5 s deadline the default share
    (3.15 s) would cut it off, but its p95 of 3 s, times the headroom, asks for
    3.75 s: dispatch waits for it rather than leave a paid job of unknown outcome."""
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = FakeAdapter("local", delay_s=3.2)
    install_fakes(app, fakes)
    for _ in range(5):
        await app.state.gateway.health.record_success("local", 3.0)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "4500"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "local"
    assert "x-klein-possibly-billed-usd" not in resp.headers


# ---- the local backend's cost figure ----------------------------------------------


@pytest.mark.parametrize("figure", ["NaN", "-0.5", "1e12"])
async def test_a_broken_local_cost_figure_never_fails_a_paid_success(figure: str) -> None:
    """Through the real local adapter at the wire: the answer is a good image
    with a cost figure that is no amount; the caller gets the image, billed at
    the price sheet's figure, and every spend metric stays consistent."""
    b64 = base64.b64encode(png_bytes(1024, 1024)).decode()
    image = {"b64_json": b64, "width": 1024, "height": 1024, "seed": 5, "content_type": "image/png", "nsfw": False}
    doc = json.dumps({"images": [image], "seed": 5, "timings": {"queue_ms": 1.0, "inference_ms": 500.0, "batch_size": 1}, "cost_usd_estimate": 0})
    body = doc.replace('"cost_usd_estimate": 0', f'"cost_usd_estimate": {figure}')
    router = respx.Router(assert_all_called=False)
    router.post("http://local.test:9000/v1/images/generations").respond(200, content=body.encode(), headers={"content-type": "application/json"})
    app = make_app(transport=httpx.MockTransport(router.async_handler))
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "local"
    sheet = app.state.gateway.fleet.backends["local"].bill(ImageJob(JobKind.GENERATE, "x", 1024, 1024), 1)
    assert Decimal(resp.headers["x-klein-cost-usd"]) == sheet
    assert sample(app, "klein_cost_usd_total", {"backend": "local", "caller": "anonymous"}) == pytest.approx(float(sheet))


# ---- reference images are fetched together, within the attempt -----------------------

REF_URLS = [f"http://93.184.216.{i}/ref.png" for i in (10, 11, 12)]  # public literals: no DNS needed


def slow_reference_router(delay_s: float) -> respx.Router:
    router = respx.Router(assert_all_called=False)

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay_s)
        return httpx.Response(200, content=png_bytes(256, 256), headers={"content-type": "image/png"})

    for url in REF_URLS:
        router.get(url).mock(side_effect=slow)
    return router


@pytest.mark.parametrize(
    ("delay_s", "deadline_ms", "status"),
    [
        pytest.param(0.8, 2000, 200, id="three-slow-references-fit-when-fetched-together"),
        pytest.param(30.0, 1500, 504, id="a-hanging-reference-host-ends-at-the-deadline"),
    ],
)
async def test_reference_urls_are_fetched_concurrently_within_the_deadline(delay_s: float, deadline_ms: int, status: int) -> None:
    """The local backend needs reference bytes, so the gateway fetches the
    caller's URLs. One after another, three that take 0.8 s each would need
    2.4 s of a 2 s deadline; fetched together they take 0.8 s. A host that
    never answers costs the deadline, not ten seconds per reference."""
    app = make_app(transport=httpx.MockTransport(slow_reference_router(delay_s).async_handler))
    install_fakes(app, {n: FakeAdapter(n) for n in PRICE_ORDER})
    body = {"prompt": "the same lighthouse at night", "images": REF_URLS, "size": "1024x1024", "response_format": "b64_json", "model": "local/flux-2-klein-4b"}
    t0 = time.monotonic()
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/edits", json=body, headers={"x-klein-deadline-ms": str(deadline_ms)})
    elapsed = time.monotonic() - t0
    assert resp.status_code == status, resp.text
    assert elapsed < deadline_ms / 1000 + 0.5, elapsed
    if status == 200:
        assert resp.headers["x-klein-backend"] == "local"


# ---- the gateway's own overload ----------------------------------------------


class StallingFake(FakeAdapter):
    """A connect that fails after the event loop was held `stall_s` (other
    requests' CPU, as in a burst of thousands), then answers."""

    def __init__(self, name: str, failures: int, stall_s: float) -> None:
        super().__init__(name)
        self.settings = AdapterSettings(name=name, base_url="http://fake.test", credential=None, timeouts=Timeouts(connect=0.5))  # overload: the loop 0.1 s late
        self.failures = failures
        self.stall_s = stall_s

    async def generate(self, job, deadline):
        if len(self.calls) < self.failures:
            self.calls.append(job)
            await asyncio.sleep(0.12)  # lets the loop-lag ticker start
            time.sleep(self.stall_s)  # holds the loop on purpose, as a burst's other requests do
            raise ProviderError(FailureClass.UNREACHABLE, "could not connect: ConnectTimeout")
        return await super().generate(job, deadline)


async def test_a_connect_failed_while_the_gateway_was_overloaded_is_retried_on_the_same_backend_and_never_opens_its_breaker() -> None:
    """Five failed connects in a row, each after the loop ran late, would open
    the breaker (three in a row do) and fail over; as the gateway's overload they
    do neither: the cheapest backend is tried again and serves."""
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = StallingFake("local", failures=5, stall_s=0.2)
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "30000"})
        views = await app.state.gateway.health.views(["local"])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "local"
    assert resp.headers["x-klein-attempts"] == "6"
    assert not fakes["replicate"].calls
    assert views["local"].state is BreakerState.CLOSED
    assert views["local"].error_rate == 0
    assert sample(app, "klein_upstream_attempts_total", {"backend": "local", "outcome": "unreachable"}) == 5
    assert sample(app, "klein_failovers_total", {"from_backend": "local", "reason": "unreachable"}) == 0


async def test_a_connect_failed_while_the_loop_ran_on_time_counts_against_the_backend_and_fails_over() -> None:
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = StallingFake("local", failures=1, stall_s=0.0)
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "30000"})
        views = await app.state.gateway.health.views(["local"])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "replicate"
    assert len(fakes["local"].calls) == 1
    assert views["local"].error_rate == 1
    assert sample(app, "klein_failovers_total", {"from_backend": "local", "reason": "unreachable"}) == 1


async def test_overload_retries_stop_at_their_limit_and_the_request_fails_over() -> None:
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = StallingFake("local", failures=OVERLOAD_RETRIES + 5, stall_s=0.2)
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=BODY, headers={"x-klein-deadline-ms": "30000"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-klein-backend"] == "replicate"
    assert len(fakes["local"].calls) == OVERLOAD_RETRIES + 1
    assert resp.headers["x-klein-attempts"] == str(OVERLOAD_RETRIES + 2)


async def test_an_outcome_unknown_answer_keeps_its_idempotency_key_so_the_retry_pays_nothing_again() -> None:
    """A 502 `outcome_unknown` may have been billed: the SDK is told not to retry
    blindly, and a retry with the same Idempotency-Key replays the 502 instead of
    submitting to a provider again."""
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in PRICE_ORDER}
    fakes["local"] = CancellingFake("local", [UNKNOWN, UNKNOWN], cancel_answer=False)
    install_fakes(app, fakes)
    headers = {"x-klein-deadline-ms": "10000", "Idempotency-Key": "unknown-once"}
    async with AsyncTestClient(app) as client:
        first = await client.post("/v1/images/generations", json=BODY, headers=headers)
        again = await client.post("/v1/images/generations", json=BODY, headers=headers)
    assert first.status_code == 502 and first.json()["error"]["code"] == "outcome_unknown", first.text
    assert first.headers["x-should-retry"] == "false"
    assert again.status_code == 502 and again.headers.get("idempotent-replayed") == "true", again.text
    assert len(fakes["local"].calls) == 1  # the provider was asked once, whatever the caller retried
    assert all(not fakes[name].calls for name in PRICE_ORDER if name != "local")


# ---- a shape request is served at the size the provider produced ------------------

REPLICATE_CREATE = "https://api.replicate.com/v1/models/black-forest-labs/flux-2-klein-4b/predictions"
REPLICATE_OUT = "https://replicate.delivery/xezq/abc/out-0.png"
REPLICATE_USD_PER_MP = Decimal("0.001")  # pricing/replicate.yaml: exact output MP


def replicate_router(produced: tuple[int, int]) -> tuple[respx.Router, list[httpx.Request]]:
    """Replicate at the wire, answering one prediction whose image is `produced`;
    every request to any other host is kept in the list (and answered 500)."""
    router = respx.Router(assert_all_called=False)
    prediction = {"id": "p1", "status": "succeeded", "output": [REPLICATE_OUT], "error": None, "metrics": {"predict_time": 0.5}, "urls": {"get": "https://api.replicate.com/v1/predictions/p1"}}
    router.post(REPLICATE_CREATE).respond(201, json=prediction)
    router.get(REPLICATE_OUT).respond(200, content=png_bytes(*produced), headers={"content-type": "image/png"})
    elsewhere: list[httpx.Request] = []

    def other(request: httpx.Request) -> httpx.Response:
        elsewhere.append(request)
        return httpx.Response(500)

    router.route().mock(side_effect=other)
    return router, elsewhere


SHAPE_CASES = [
    # (id, request's size fields, what Replicate made, served?)
    pytest.param({"aspect_ratio": "16:9"}, (1360, 768), True, id="16:9-made-1360x768-on-the-16-grid"),
    pytest.param({"aspect_ratio": "16:9"}, (1365, 768), True, id="16:9-made-the-predicted-1365x768"),
    pytest.param({"aspect_ratio": "16:9"}, (1024, 1024), False, id="16:9-made-a-square-is-wrong"),
    pytest.param({"aspect_ratio": "16:9"}, (640, 360), False, id="16:9-made-a-quarter-of-the-pixels-is-wrong"),
    pytest.param({"size": "1024x1024"}, (1008, 1008), False, id="exact-size-stays-strict"),
]


@pytest.mark.parametrize(("size_fields", "produced", "served"), SHAPE_CASES)
async def test_a_shape_request_is_served_once_at_the_size_produced_and_billed_for_it(size_fields, produced, served) -> None:
    router, elsewhere = replicate_router(produced)
    app = make_app(transport=httpx.MockTransport(router.async_handler))
    body = {"prompt": "a harbour at dawn", "response_format": "b64_json", "provider": {"ignore": ["local"]}, **size_fields}  # Replicate first, fal next
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json=body)
        rows = await ledger_rows(app)
    assert len(router.routes[0].calls) == 1  # one prediction bought
    if not served:  # a wrong size is a delivery failure, bought again elsewhere
        assert sample(app, "klein_upstream_attempts_total", {"backend": "replicate", "outcome": "delivery_failed"}) == 1
        assert elsewhere, "a wrong size should fail over"
        return
    assert elsewhere == []  # no other provider was called
    assert resp.status_code == 200, resp.text
    w, h = produced
    assert resp.headers["x-klein-backend"] == "replicate" and resp.headers["x-klein-attempts"] == "1"
    assert Decimal(resp.headers["x-klein-cost-usd"]) == REPLICATE_USD_PER_MP * Decimal(w * h) / Decimal(1_000_000)
    answer = resp.json()
    assert answer["size"] == f"{w}x{h}" and [d["size"] for d in answer["data"]] == [f"{w}x{h}"]
    assert image_size_of(base64.b64decode(answer["data"][0]["b64_json"])) == produced
    assert sample(app, "klein_possible_double_spend_total", {"backend": "fal"}) == 0
    [row] = rows
    assert row.megapixels == Decimal(w * h) / Decimal(1_000_000)
    assert row.estimated_usd == Decimal(resp.headers["x-klein-cost-usd"])


async def ledger_rows(app) -> list:
    now = datetime.now(UTC)
    return await app.state.gateway.billing.ledger.query(now - timedelta(hours=1), now + timedelta(hours=1))
