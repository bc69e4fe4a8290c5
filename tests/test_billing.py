"""Money per caller through the real HTTP app, in one process: reservations that
are released or settled, image rate limits, the key's price ceiling, a dead
Redis, the billed-figure header and the ledger row of every request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from litestar.testing import AsyncTestClient

from gateway.domain.callers import Caller as LabelledKey
from gateway.domain.callers import caller_label
from gateway.money.keys import hash_key
from gateway.providers.base import FailureClass, ProviderError, ProviderResult
from tests.gateway_support import ENV, FakeAdapter, install_fakes, make_app
from tests.redis_server import free_port

BACKENDS = ["local", "replicate", "fal", "empiriolabs", "runflow"]
BODY = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "b64_json"}
LOCAL_1MP = Decimal("0.00041506")  # local at 1024x1024: 2.50/3600 x 0.57 x 1.048576 (the sheet's worked example)


def keys_file(tmp_path: Path, **keys: dict) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": name, "key_sha256": hash_key(f"secret-{name}"), **spec} for name, spec in keys.items()]}))
    return path


METRICS_TOKEN = "billing-scrape-token-1f2e"  # caller keys are required, so /metrics needs a token
SCRAPE = {"authorization": f"Bearer {METRICS_TOKEN}"}


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer secret-{name}"}


async def client_for(tmp_path: Path, scripts: dict[str, list] | None = None, env: dict[str, str] | None = None, **keys: dict):
    app = make_app({**ENV, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, **keys)), "KLEIN_METRICS_TOKEN": METRICS_TOKEN, **(env or {})})
    fakes = {name: FakeAdapter(name, (scripts or {}).get(name, ["ok"])) for name in BACKENDS}
    install_fakes(app, fakes)
    return app, fakes


async def ledger_rows(app) -> list:
    now = datetime.now(UTC)
    return await app.state.gateway.billing.ledger.query(now - timedelta(hours=1), now + timedelta(hours=1))


async def test_an_unbilled_failure_releases_its_reservation(tmp_path):
    failing = [ProviderError(FailureClass.FAILED, "HTTP 500", status=500)] * 5 + ["ok"]
    app, fakes = await client_for(tmp_path, {name: failing for name in BACKENDS}, team={"budget_usd": {"day": "0.0005"}, "backends": {"only": ["local"]}})
    async with AsyncTestClient(app) as client:
        failed = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        assert failed.status_code == 502 and failed.headers["x-klein-cost-usd"] == "0"
        # The 0.00042 reserved for the failure was given back, so one more request fits.
        fakes["local"].outcomes = ["ok"]
        served = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        assert served.status_code == 200, served.text
        refused = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        rows = await ledger_rows(app)
    assert [(r.status, r.estimated_usd) for r in rows] == [(502, Decimal(0)), (200, Decimal(served.headers["x-klein-cost-usd"])), (429, Decimal(0))]


async def test_a_billed_failure_then_a_success_settles_to_both(tmp_path):
    billed_failure = ProviderError(FailureClass.FAILED, "the job ran and failed", job_id="j1", billed=True)  # surely billed, unlike an unknown outcome
    app, _ = await client_for(tmp_path, {"local": [billed_failure, "ok"]}, team={"budget_usd": {"day": "1"}, "backends": {"only": ["local", "replicate"]}})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        assert answer.status_code == 200 and answer.headers["x-klein-attempts"] == "2"
        cost = Decimal(answer.headers["x-klein-cost-usd"])
        gw = app.state.gateway
        from gateway.money.budgets import windows_at

        windows = windows_at([("day", Decimal(1))], datetime.now(UTC))
        (spent,) = await gw.billing.budgets.spent("team", windows)
    assert cost == LOCAL_1MP + Decimal("0.00104858")  # the billed local attempt and replicate's image
    assert spent == int(cost / Decimal("0.00000001"))


@pytest.mark.parametrize(
    ("budget", "refused_window"),
    [({"day": "0.0003"}, "day"), ({"day": "5", "month": "0.0003"}, "month")],
)
async def test_the_refusal_names_the_budget_and_when_it_resets(tmp_path, budget, refused_window):
    app, fakes = await client_for(tmp_path, team={"budget_usd": budget})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
    error = answer.json()["error"]
    assert answer.status_code == 429 and answer.headers["x-should-retry"] == "false"
    assert error["budget"] == refused_window and f"over its {refused_window} budget" in error["message"]
    now = datetime.now(UTC)
    resets = (datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)) if refused_window == "day" else datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    assert error["resets_at"] == resets.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert not any(f.calls for f in fakes.values())


async def test_a_budgeted_key_is_refused_503_while_redis_is_away_and_nothing_is_called(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app, fakes = await client_for(tmp_path, env={"REDIS_URL": dead}, team={"budget_usd": {"day": "1"}}, free={"rate_limit": {"requests_per_minute": 1}})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "budget_unavailable"
        assert answer.headers["x-should-retry"] == "true"
        assert not any(f.calls for f in fakes.values())
        # A rate limit protects capacity, not money: it lets requests through while Redis is away.
        for _ in range(2):
            assert (await client.post("/v1/images/generations", json=BODY, headers=auth("free"))).status_code == 200


async def test_images_per_minute_counts_images_not_requests(tmp_path):
    app, _ = await client_for(tmp_path, team={"rate_limit": {"images_per_minute": 3}})
    async with AsyncTestClient(app) as client:
        first = await client.post("/v1/images/generations", json={**BODY, "n": 2}, headers=auth("team"))
        assert first.status_code == 200
        assert (first.headers["x-ratelimit-limit-images"], first.headers["x-ratelimit-remaining-images"]) == ("3", "1")
        second = await client.post("/v1/images/generations", json={**BODY, "n": 2}, headers=auth("team"))
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
        assert second.headers["x-ratelimit-remaining-images"] == "1" and int(second.headers["retry-after"]) >= 1
        assert (await client.post("/v1/images/generations", json={**BODY, "n": 1}, headers=auth("team"))).status_code == 200
        too_many = await client.post("/v1/images/generations", json={**BODY, "n": 4}, headers=auth("team"))
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


async def test_the_keys_max_price_is_a_ceiling_the_caller_cannot_raise(tmp_path):
    app, fakes = await client_for(tmp_path, team={"max_price_usd": "0.0001"})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json={**BODY, "provider": {"max_price": 1}}, headers=auth("team"))
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "max_price_exceeded"
    assert "$0.0001" in answer.json()["error"]["message"]
    assert not any(f.calls for f in fakes.values())


class ReportingAdapter(FakeAdapter):
    """A fake whose provider says it billed a figure of its own."""

    async def generate(self, job, deadline):
        result = await super().generate(job, deadline)
        return ProviderResult(images=result.images, seed=result.seed, job_id=result.job_id, reported_cost_usd=Decimal("0.0155"))


async def test_the_providers_billed_figure_travels_beside_the_gateways(tmp_path):
    app, _ = await client_for(tmp_path, team={"backends": {"only": ["runflow"]}})
    install_fakes(app, {"runflow": ReportingAdapter("runflow")})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        metrics = (await client.get("/metrics", headers=SCRAPE)).text
        rows = await ledger_rows(app)
    assert answer.headers["x-klein-cost-usd"] == "0.01404858"  # the sheet's, as before
    assert answer.headers["x-klein-billed-usd"] == "0.0155"
    assert [(r.estimated_usd, r.billed_usd, r.billed_source) for r in rows] == [(Decimal("0.01404858"), Decimal("0.0155"), "run_cost")]
    assert 'klein_billed_usd_total{backend="runflow",source="run_cost"} 0.0155' in metrics
    assert 'klein_billed_estimate_usd_total{backend="runflow",source="run_cost"} 0.01404858' in metrics


async def test_simple_keys_and_named_keys_work_side_by_side(tmp_path):
    app, _ = await client_for(tmp_path, env={"KLEIN_GATEWAY_KEYS": "plain-one,plain-two"}, team={})
    async with AsyncTestClient(app) as client:
        for headers in (auth("team"), {"authorization": "Bearer plain-one"}, {"authorization": "Bearer plain-two"}):
            assert (await client.post("/v1/images/generations", json=BODY, headers=headers)).status_code == 200
        assert (await client.post("/v1/images/generations", json=BODY, headers={"authorization": "Bearer nope"})).status_code == 401
        mine = (await client.get("/v1/usage", params={"group_by": "key"}, headers={"authorization": "Bearer plain-one"})).json()
        names = {r.key_name for r in await ledger_rows(app)}
    assert [row["key"] for row in mine["data"]] == [caller_label(LabelledKey("plain-one"))]  # keyed, never a plain hash of the key
    assert hash_key("plain-one")[:10] not in str(names)
    assert mine["total"]["requests"] == 1
    assert "team" in names and "plain-one" not in str(names)  # no secret in the ledger


@pytest.mark.parametrize(
    ("params", "param"),
    [({"start": "yesterday"}, "start"), ({"end": "2026-13-01"}, "end"), ({"start": "2026-12-02", "end": "2026-12-01"}, "start"), ({"group_by": "key,key"}, "group_by")],
)
async def test_usage_rejects_a_bad_query_with_the_param_named(tmp_path, params, param):
    app, _ = await client_for(tmp_path, team={"admin": True})
    async with AsyncTestClient(app) as client:
        answer = await client.get("/v1/usage", params=params, headers=auth("team"))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("day_budget", "status", "fal_called"),
    [
        ("0.006", 200, True),  # 0.00041506 billed on local + fal's 0.00524288 still fit: the reservation grows
        ("0.0055", 429, False),  # they would not: stop before fal rather than overspend
    ],
)
async def test_failing_over_after_a_billed_failure_never_overspends(tmp_path, day_budget, status, fal_called):
    billed_failure = ProviderError(FailureClass.FAILED, "the job ran and failed", job_id="j1", billed=True)  # surely billed, unlike an unknown outcome
    app, fakes = await client_for(tmp_path, {"local": [billed_failure]}, team={"budget_usd": {"day": day_budget}, "backends": {"only": ["local", "fal"]}})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
        from gateway.money.budgets import windows_at

        (spent,) = await app.state.gateway.billing.budgets.spent("team", windows_at([("day", Decimal(day_budget))], datetime.now(UTC)))
    assert answer.status_code == status, answer.headers
    assert bool(fakes["fal"].calls) is fal_called
    cost = Decimal(answer.headers["x-klein-cost-usd"])
    assert cost <= Decimal(day_budget) and spent == int(cost / Decimal("0.00000001"))
    if status == 429:
        assert cost == LOCAL_1MP and answer.json()["error"]["code"] == "insufficient_quota"


def test_an_unreachable_ledger_database_is_a_configuration_error_without_the_password():
    from gateway.config import ConfigError
    from tests.redis_server import free_port

    url = f"postgresql://klein:hunter2-secret@127.0.0.1:{free_port()}/usage?connect_timeout=1"
    with pytest.raises(ConfigError) as exc:
        make_app({**ENV, "DATABASE_URL": url, "KLEIN_USAGE_LEDGER": ""})
    assert "DATABASE_URL" in str(exc.value) and "hunter2" not in str(exc.value)


@pytest.mark.parametrize(
    ("day_budget", "local_fails", "served_by", "never_called"),
    [
        # $0.001 pays for local (0.00042) but not for any fallback: served, nothing else at risk.
        ("0.001", False, "local", ["replicate", "fal", "empiriolabs", "runflow"]),
        # $0.002 also pays for replicate (0.00105): local fails, replicate serves, dearer ones never run.
        ("0.002", True, "replicate", ["fal", "empiriolabs", "runflow"]),
    ],
)
async def test_a_tight_budget_still_serves_with_the_fallbacks_it_can_pay_for(tmp_path, day_budget, local_fails, served_by, never_called):
    scripts = {"local": [ProviderError(FailureClass.FAILED, "HTTP 500", status=500)]} if local_fails else {}
    app, fakes = await client_for(tmp_path, scripts, team={"budget_usd": {"day": day_budget}})
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY, headers=auth("team"))
    assert answer.status_code == 200, answer.headers
    assert answer.headers["x-klein-backend"] == served_by
    assert not any(fakes[name].calls for name in never_called)


async def test_every_authenticated_request_gets_a_ledger_row_even_a_bad_one(tmp_path):
    app, _ = await client_for(tmp_path, team={})
    async with AsyncTestClient(app) as client:
        assert (await client.post("/v1/images/generations", json={**BODY, "size": "7x7"}, headers=auth("team"))).status_code == 400
        assert (await client.post("/v1/images/generations", json=BODY, headers=auth("team"))).status_code == 200
        assert (await client.post("/v1/images/generations", json=BODY, headers={"authorization": "Bearer unknown"})).status_code == 401
        rows = await ledger_rows(app)
    assert [(r.key_name, r.status, r.images) for r in rows] == [("team", 400, 0), ("team", 200, 1)]


async def test_an_open_gateway_shows_all_usage(tmp_path):
    app = make_app()
    install_fakes(app, {name: FakeAdapter(name) for name in BACKENDS})
    async with AsyncTestClient(app) as client:
        assert (await client.post("/v1/images/generations", json=BODY)).status_code == 200
        usage = (await client.get("/v1/usage", params={"group_by": "key,backend"})).json()
    assert usage["data"] == [{"key": "anonymous", "backend": "local", "requests": 1, "images": 1, "megapixels": "1.048576", "cost_usd": "0.00041506", "billed_usd": None}]


async def _job_when_done(client, job_id: str, headers: dict[str, str]) -> dict:
    import asyncio

    for _ in range(200):
        job = (await client.get(f"/v1/images/jobs/{job_id}", headers=headers)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never finished: {job}")


async def test_async_jobs_spend_from_their_owners_budget_and_get_a_ledger_row(tmp_path):
    # Room for two local images, not three: the third job is refused by the budget, not served.
    app, fakes = await client_for(tmp_path, team={"budget_usd": {"day": "0.001"}, "backends": {"only": ["local"]}})
    async with AsyncTestClient(app) as client:
        jobs = []
        for _ in range(3):
            accepted = await client.post("/v1/images/generations", json=BODY, headers={**auth("team"), "Prefer": "respond-async"})
            assert accepted.status_code == 202, accepted.text
            jobs.append(await _job_when_done(client, accepted.json()["id"], auth("team")))
        rows = await ledger_rows(app)
        from gateway.money.budgets import windows_at

        (spent,) = await app.state.gateway.billing.budgets.spent("team", windows_at([("day", Decimal("0.001"))], datetime.now(UTC)))
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded", "failed"]
    assert jobs[2]["error"]["code"] == "insufficient_quota"
    assert len(fakes["local"].calls) == 2
    job_rows = [r for r in rows if r.route.endswith("_async")]
    assert sorted(r.request_id for r in job_rows) == sorted(j["id"] for j in jobs)
    assert sum((r.estimated_usd for r in job_rows), Decimal(0)) == sum((Decimal(j["cost_usd"] or "0") for j in jobs), Decimal(0)) == 2 * LOCAL_1MP
    assert spent == int(2 * LOCAL_1MP / Decimal("0.00000001"))
