"""Admin endpoints: knobs change behaviour at run time; stats tell paid from free."""

from __future__ import annotations

import base64
import time

import pytest

from tests.emulators.support import ALL, PAID, PROBES, knobs, send, stats


@pytest.mark.parametrize("name", ALL)
async def test_probes_never_create_a_paid_generation(client, fleet, name):
    for call in PROBES[name]:
        response = await send(client, fleet, name, call)
        assert response.status_code in (200, 404), (call, response.text)  # fal's probe id does not exist
    counters = await stats(client, fleet, name)
    assert counters["generations"] == 0 and counters["paid_calls"] == 0
    assert counters["free_calls"] == len(PROBES[name])
    await send(client, fleet, name, PAID[name])
    counters = await stats(client, fleet, name)
    assert counters["generations"] == 1 and counters["paid_calls"] == 1


async def test_stats_count_requests_by_route_and_images(client, fleet):
    await send(client, fleet, "fal", PAID["fal"])
    job = (await send(client, fleet, "fal", PAID["fal"])).json()
    await client.get(job["status_url"], headers={"Authorization": f"Key {fleet['fal'].key}"})
    counters = await stats(client, fleet, "fal")
    assert counters["requests"] == {"submit": 2, "status": 1}
    assert counters["images"] == 2 and counters["provider"] == "fal"


async def test_latency_knob_changes_at_run_time(client, fleet):
    call = PAID["empiriolabs"]
    await knobs(client, fleet, "empiriolabs", {"latency": {"kind": "fixed", "ms": 150}})
    started = time.monotonic()
    await send(client, fleet, "empiriolabs", call)
    assert time.monotonic() - started >= 0.15
    await knobs(client, fleet, "empiriolabs", {"latency": {"ms": 0}})
    started = time.monotonic()
    await send(client, fleet, "empiriolabs", call)
    assert time.monotonic() - started < 0.1


async def test_sync_generation_time_is_the_job_timing(client, fleet):
    await knobs(client, fleet, "empiriolabs", {"job": {"run_ms": 120}})
    started = time.monotonic()
    assert (await send(client, fleet, "empiriolabs", PAID["empiriolabs"])).status_code == 200
    assert time.monotonic() - started >= 0.12


async def test_pad_to_bytes_makes_images_that_big_and_still_decodable(client, fleet):
    await knobs(client, fleet, "local", {"pad_to_bytes": 1_100_000})
    body = (await send(client, fleet, "local", PAID["local"])).json()
    data = base64.b64decode(body["images"][0]["b64_json"])
    assert len(data) >= 1_100_000 and len(body["images"][0]["b64_json"]) >= 1_450_000


async def test_knobs_get_reflects_merges_and_reset_restores(client, fleet):
    base = fleet["runflow"].base_url
    merged = await knobs(client, fleet, "runflow", {"faults": {"rate_limited": 0.25}, "cancel_spelling": "cancelled"})
    assert merged["faults"]["rate_limited"] == 0.25 and merged["faults"]["server_error"] == 0.0
    assert (await client.get(base + "/_admin/knobs")).json()["cancel_spelling"] == "cancelled"
    await send(client, fleet, "runflow", PAID["runflow"])
    kept = await client.post(base + "/_admin/reset", json={"keep_knobs": True})
    assert kept.json() == {"reset": True, "kept_knobs": True}
    assert (await stats(client, fleet, "runflow"))["requests"] == {}
    assert (await client.get(base + "/_admin/knobs")).json()["cancel_spelling"] == "cancelled"
    await client.post(base + "/_admin/reset")
    assert (await client.get(base + "/_admin/knobs")).json()["cancel_spelling"] == "canceled"


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"latnecy": {}}, "latnecy"),
        ({"faults": {"rate_limited": 2}}, "faults.rate_limited"),
        ({"faults": {"rate_limited": 0.7, "server_error": 0.7}}, "sum"),
        ({"faults": {"queue": ["explode"]}}, "explode"),
        ({"pad_to_bytes": "big"}, "pad_to_bytes"),
    ],
)
async def test_bad_knobs_are_refused_naming_the_field(client, fleet, patch, names):
    response = await client.post(fleet["fal"].base_url + "/_admin/knobs", json=patch)
    assert response.status_code == 400 and names in response.json()["error"]
    assert (await client.get(fleet["fal"].base_url + "/_admin/knobs")).json()["faults"]["rate_limited"] == 0.0


async def test_admin_and_files_are_not_protocol_traffic(client, fleet):
    await client.get(fleet["replicate"].base_url + "/_admin/knobs")
    await client.get(fleet["replicate"].base_url + "/files/nothing.png")
    counters = await stats(client, fleet, "replicate")
    assert counters["requests"] == {} and counters["free_calls"] == 0


async def test_unknown_paths_get_the_providers_404_and_wrong_methods_405(client, fleet):
    missing = await client.get(fleet["runflow"].base_url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
    wrong = await client.delete(fleet["empiriolabs"].base_url + "/v1/images/generations")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
