"""Every fault knob, on every provider, produces that provider's documented shape."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.emulators.support import ALL, HOSTED, PAID, auth, knobs, send, stats


def error_shape(name: str, body: dict) -> str:
    """The provider's error code/kind, asserting the envelope is the provider's."""
    if name == "fal":
        assert isinstance(body["detail"], (str, list))
        return body.get("error_type") or body["detail"]
    if name == "replicate":
        assert {"title", "detail", "status"} <= set(body)
        return body["title"]
    if name == "runflow":
        assert set(body) == {"code", "message", "errors"}
        return body["code"]
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]["code"]


@pytest.mark.parametrize("name", HOSTED)
@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_bad_credentials_get_the_providers_401(client, fleet, name, key):
    headers = {} if key is None else auth(fleet, name, key)
    response = await send(client, fleet, name, PAID[name], headers=headers)
    assert response.status_code == 401
    code = error_shape(name, response.json())
    expected = {"runflow": "UNAUTHORIZED", "empiriolabs": "missing_api_key" if key is None else "invalid_api_key", "replicate": "Unauthenticated"}
    if name in expected:
        assert code == expected[name]
    counters = await stats(client, fleet, name)
    assert counters["auth_failures"] == 1 and counters["generations"] == 0


@pytest.mark.parametrize("name", ALL)
async def test_rate_limited_is_429_with_retry_after(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"rate_limited": 1.0, "retry_after_s": 7}})
    response = await send(client, fleet, name, PAID[name])
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    code = error_shape(name, response.json())
    assert code == {"fal": "rate_limited", "replicate": "Too Many Requests", "runflow": "RATE_LIMITED", "empiriolabs": "rate_limit_exceeded", "local": "queue_full"}[name]
    if name == "replicate":
        assert response.json()["detail"].startswith("Request was throttled")
    counters = await stats(client, fleet, name)
    assert counters["faults"] == {"rate_limited": 1} and counters["generations"] == 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_the_configured_5xx(client, fleet, name, status):
    await knobs(client, fleet, name, {"faults": {"server_error": 1.0, "server_error_status": status}})
    response = await send(client, fleet, name, PAID[name])
    assert response.status_code == status
    error_shape(name, response.json())
    if name == "fal":
        assert response.headers["x-fal-error-type"] == response.json()["error_type"]
    if name == "runflow" and status == 503:
        assert response.json()["code"] == "MODEL_UNAVAILABLE"
    if name == "empiriolabs" and status == 503:
        assert response.json()["error"]["code"] == "model_unavailable"


@pytest.mark.parametrize("name", ALL)
async def test_out_of_credit(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"out_of_credit": 1.0}})
    response = await send(client, fleet, name, PAID[name])
    assert response.status_code == (403 if name == "fal" else 402)
    error_shape(name, response.json())


@pytest.mark.parametrize("name", ALL)
async def test_malformed_json_is_a_200_that_does_not_parse(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"malformed": 1.0}})
    response = await send(client, fleet, name, PAID[name])
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        response.json()


@pytest.mark.parametrize("name", ALL)
async def test_reset_looks_like_a_transport_error_and_the_server_keeps_serving(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"queue": ["reset"]}})
    with pytest.raises(httpx.TransportError) as caught:
        await send(client, fleet, name, PAID[name])
    assert not isinstance(caught.value, httpx.TimeoutException)
    after = await send(client, fleet, name, PAID[name])
    assert after.status_code in (200, 201)


@pytest.mark.parametrize("name", ALL)
async def test_timeout_holds_past_the_client_timeout(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"queue": ["timeout"], "timeout_hold_s": 30}})
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await send(client, fleet, name, PAID[name], timeout=0.2)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("name", ALL)
async def test_timeout_that_ends_before_the_client_gives_up_is_a_504(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"queue": ["timeout"], "timeout_hold_s": 0.1}})
    response = await send(client, fleet, name, PAID[name])
    assert response.status_code == 504
    error_shape(name, response.json())


@pytest.mark.parametrize("name", ["empiriolabs", "local"])
async def test_stuck_on_a_sync_provider_holds_like_a_timeout(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"stuck": 1.0, "timeout_hold_s": 30}})
    with pytest.raises(httpx.ReadTimeout):
        await send(client, fleet, name, PAID[name], timeout=0.2)


async def test_faults_reach_polls_only_with_scope_all(client, fleet):
    created = await send(client, fleet, "fal", PAID["fal"])
    status_url = created.json()["status_url"]
    await knobs(client, fleet, "fal", {"faults": {"rate_limited": 1.0}})
    assert (await client.get(status_url, headers=auth(fleet, "fal"))).status_code == 200
    await knobs(client, fleet, "fal", {"faults": {"scope": "all"}})
    assert (await client.get(status_url, headers=auth(fleet, "fal"))).status_code == 429


async def test_fault_queue_is_consumed_in_order_then_healthy(client, fleet):
    await knobs(client, fleet, "empiriolabs", {"faults": {"queue": ["rate_limited", "none", "server_error"]}})
    codes = [(await send(client, fleet, "empiriolabs", PAID["empiriolabs"])).status_code for _ in range(4)]
    assert codes == [429, 200, 500, 200]


async def test_seeded_fault_rate_mixes_outcomes_reproducibly(client, fleet):
    async def run() -> list[int]:
        await knobs(client, fleet, "empiriolabs", {"seed": 1234, "faults": {"server_error": 0.5}})
        return [(await send(client, fleet, "empiriolabs", PAID["empiriolabs"])).status_code for _ in range(30)]

    first = await run()
    fleet.reset()
    second = await run()
    assert first == second
    assert 5 <= first.count(500) <= 25 and 500 in first and 200 in first


async def test_nsfw_rate_flags_fal_images(client, fleet):
    await knobs(client, fleet, "fal", {"nsfw_rate": 1.0})
    job = (await send(client, fleet, "fal", PAID["fal"])).json()
    result = (await client.get(job["response_url"], headers=auth(fleet, "fal"))).json()
    assert result["has_nsfw_concepts"] == [True]


@pytest.mark.parametrize("name", ["runflow", "replicate"])
async def test_stuck_jobs_stay_queued(client, fleet, name):
    await knobs(client, fleet, name, {"faults": {"stuck": 1.0}})
    created = (await send(client, fleet, name, PAID[name])).json()
    path = f"/v1/runs/{created['id']}" if name == "runflow" else f"/v1/predictions/{created['id']}"
    body = (await client.get(fleet[name].base_url + path, headers=auth(fleet, name))).json()
    assert body.get("status_code", body.get("status")) in ("queued", "starting")


@pytest.mark.parametrize("name", ALL)
async def test_trickle_sends_the_body_in_paced_chunks_whatever_the_provider(client, fleet, name):
    """Every read arrives quickly, so a per-read timeout never fires; the whole
    body takes (chunks - 1) x interval. The body is intact when it is done."""
    await knobs(client, fleet, name, {"trickle": {"chunk_bytes": 64, "interval_ms": 20}})
    t0 = time.monotonic()
    response = await send(client, fleet, name, PAID[name])
    elapsed = time.monotonic() - t0
    assert response.status_code < 300, response.text
    chunks = -(-len(response.content) // 64)
    assert chunks >= 3
    assert elapsed >= (chunks - 1) * 0.02 * 0.8, (elapsed, chunks)
    assert response.json()  # complete JSON, only slow


async def test_trickle_knob_rejects_negative_values(client, fleet):
    response = await client.post(f"{fleet['fal'].base_url}/_admin/knobs", json={"trickle": {"chunk_bytes": -1}})
    assert response.status_code == 400 and "trickle" in response.text
