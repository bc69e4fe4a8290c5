"""Async image jobs, webhooks and idempotency keys, end to end in one process.

The gateway is served by uvicorn on 127.0.0.1 with jobs in memory; upstream
is the fal emulator (the only backend with a credential), whose counters
say what was paid for; webhooks go to a real HTTP receiver on loopback.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import standardwebhooks
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.observability.metrics import GatewayMetrics
from tests.emulators import EmulatorFleet
from tests.gateway_support import ServerThread, image_size_of, png_bytes
from tests.jobs_support import (
    PRICING,
    WebhookReceiver,
    config_with,
    iter_pages,
    new_webhook_secret,
    wait_job,
)

KEYS = ["key-a", "key-b", "key-list", "key-bad", "key-idem", "key-hook", "key-busy"]
BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "b64_json"}
ASYNC = {"Prefer": "respond-async"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Rig:
    def __init__(self, fleet: EmulatorFleet, server: ServerThread, secret: str, metrics: GatewayMetrics) -> None:
        self.fleet, self.server, self.secret, self.metrics = fleet, server, secret, metrics
        self.http = httpx.Client(timeout=30)

    @property
    def url(self) -> str:
        return self.server.url

    def fal(self) -> dict[str, Any]:
        return self.http.get(f"{self.fleet['fal'].base_url}/_admin/stats").json()

    def knobs(self, patch: dict[str, Any]) -> None:
        assert self.http.post(f"{self.fleet['fal'].base_url}/_admin/knobs", json=patch).status_code == 200

    def submit(self, key: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(f"{self.url}/v1/images/generations", json=body or BODY, headers={**ASYNC, **auth(key), **(headers or {})})


METRICS_TOKEN = "jobs-scrape-token-77a1"  # caller keys are required, so /metrics needs a token
SCRAPE = {"authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    fleet = EmulatorFleet.start_in_thread(["fal"])
    secret = new_webhook_secret()
    config = config_with(tmp_path_factory.mktemp("jobs"), webhook_allow=["127.0.0.1"], webhook_retry_delays_s=[0.05, 0.1, 0.2], job_concurrency=4)
    env = {**fleet.env(), "KLEIN_GATEWAY_KEYS": ",".join(KEYS), "KLEIN_WEBHOOK_SECRET": secret, "KLEIN_METRICS_TOKEN": METRICS_TOKEN}
    metrics = GatewayMetrics(registry=CollectorRegistry())
    app = create_app(config, PRICING, env=env, probes=False, metrics=metrics)
    try:
        with ServerThread(app) as server:
            yield Rig(fleet, server, secret, metrics)
    finally:
        fleet.stop_thread()


@pytest.fixture(autouse=True)
def healthy_fal(rig: Rig) -> Iterator[None]:
    yield
    rig.knobs({"job": {"queue_ms": 0, "run_ms": 0}, "faults": {"queue": []}})


# ---- the SDK and the contract ----------------------------------------------


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_sdk_with_prefer_respond_async_gets_202_and_a_job_that_succeeds_at_the_asked_size(rig: Rig, response_format: str) -> None:
    client = openai.OpenAI(base_url=rig.url + "/v1", api_key="key-a", max_retries=0)
    raw = client.images.with_raw_response.generate(model="flux-2-klein-4b", prompt="a red fox", size="512x768", response_format=response_format, extra_headers=ASYNC)  # type: ignore[arg-type]
    assert raw.status_code == 202
    job = raw.http_response.json()
    assert raw.headers["location"] == f"/v1/images/jobs/{job['id']}"
    assert raw.headers["preference-applied"] == "respond-async"
    assert job["object"] == "image.job" and job["id"].startswith("imgjob_") and job["status"] in ("queued", "running")
    done = wait_job(rig.http, rig.url, job["id"], headers=auth("key-a"))
    assert done["status"] == "succeeded", done
    assert done["backend"] == "fal" and done["attempts"] == 1 and done["error"] is None and done["completed"] >= done["created"]
    item = done["result"]["data"][0]
    data = base64.b64decode(item["b64_json"]) if response_format == "b64_json" else rig.http.get(item["url"]).content
    assert image_size_of(data) == (512, 768)


def test_without_prefer_the_answer_is_synchronous_and_matches_a_job_result(rig: Rig) -> None:
    sync = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=auth("key-a"))
    assert sync.status_code == 200 and "preference-applied" not in sync.headers
    job = wait_job(rig.http, rig.url, rig.submit("key-a").json()["id"], headers=auth("key-a"))
    assert set(job["result"]) == set(sync.json()) == {"created", "data", "output_format", "size"}
    assert job["result"]["size"] == sync.json()["size"] == "512x512"
    assert job["cost_usd"] == sync.headers["x-klein-cost-usd"]  # same plan and price sheet


def test_a_job_costs_what_its_attempts_billed_failed_billed_attempts_included(rig: Rig) -> None:
    """The first fal job fails after running (billed); dispatch fails over to nothing else, so
    the job fails and says what it spent, the same figure a synchronous request reports."""
    rig.knobs({"faults": {"queue": ["job_failed"]}})
    sync = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=auth("key-a"))
    rig.knobs({"faults": {"queue": ["job_failed"]}})
    job = wait_job(rig.http, rig.url, rig.submit("key-a").json()["id"], headers=auth("key-a"))
    assert job["status"] == "failed" and job["error"]["code"] == sync.json()["error"]["code"]
    assert job["cost_usd"] == sync.headers["x-klein-cost-usd"]
    assert job["attempts"] == int(sync.headers["x-klein-attempts"]) == 1


# ---- ownership, listing, cancel ----------------------------------------------


def test_another_caller_cannot_read_list_or_cancel_a_job(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 3000}})
    job = rig.submit("key-a").json()
    other = auth("key-b")
    assert rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}", headers=other).status_code == 404
    cancel = rig.http.post(f"{rig.url}/v1/images/jobs/{job['id']}/cancel", headers=other)
    assert cancel.status_code == 404 and cancel.json()["error"]["code"] == "job_not_found"
    listed = [j["id"] for page in iter_pages(rig.http, rig.url, headers=other, limit=50) for j in page["data"]]
    assert job["id"] not in listed
    assert rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}", headers=auth("key-a")).json()["status"] in ("queued", "running")
    assert rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}").status_code == 401


def test_listing_is_the_owners_jobs_newest_first_paginated_and_filtered(rig: Rig) -> None:
    ids = [rig.submit("key-list").json()["id"] for _ in range(5)]
    for job_id in ids:
        wait_job(rig.http, rig.url, job_id, headers=auth("key-list"))
    pages = list(iter_pages(rig.http, rig.url, headers=auth("key-list"), limit=2))
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert [j["id"] for p in pages for j in p["data"]] == ids[::-1]
    succeeded = rig.http.get(f"{rig.url}/v1/images/jobs", params={"status": "succeeded", "limit": 100}, headers=auth("key-list")).json()
    assert [j["id"] for j in succeeded["data"]] == ids[::-1]
    canceled = rig.http.get(f"{rig.url}/v1/images/jobs", params={"status": "canceled"}, headers=auth("key-list")).json()
    assert canceled["data"] == [] and canceled["has_more"] is False


@pytest.mark.parametrize(("params", "param"), [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"), ({"status": "done"}, "status")])
def test_listing_rejects_bad_parameters(rig: Rig, params: dict[str, str], param: str) -> None:
    resp = rig.http.get(f"{rig.url}/v1/images/jobs", params=params, headers=auth("key-list"))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_cancel_ends_a_running_job_and_cancels_its_provider_job(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 10_000}})
    before = rig.fal()
    job = rig.submit("key-a").json()
    deadline = time.monotonic() + 10
    while rig.fal()["generations"] == before["generations"] and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # the provider job id reaches the record
    canceled = rig.http.post(f"{rig.url}/v1/images/jobs/{job['id']}/cancel", headers=auth("key-a"))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled" and canceled.json()["completed"] is not None
    deadline = time.monotonic() + 5
    while rig.fal()["cancels"] == before["cancels"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.fal()["cancels"] > before["cancels"]
    time.sleep(0.3)
    assert rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}", headers=auth("key-a")).json()["status"] == "canceled"
    again = rig.http.post(f"{rig.url}/v1/images/jobs/{job['id']}/cancel", headers=auth("key-a"))
    assert again.status_code == 200 and again.json()["status"] == "canceled"


# ---- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "headers", "param", "code"),
    [
        ({"webhook_url": "http://example.com/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://10.1.2.3/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://localhost/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://[::1]/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://user:pw@example.com/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "ftp://example.com/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": 7}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://[::1"}, {}, "webhook_url", "invalid_webhook_url"),  # unclosed bracket: was a 500
        ({"webhook_url": "https://example.com:99999/hook"}, {}, "webhook_url", "invalid_webhook_url"),  # was accepted, then never delivered
        ({"webhook_url": "https://127.1/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://0x7f000001/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://[2002:a9fe:a9fe::]/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://100.100.100.200/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://192.0.0.8/hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"webhook_url": "https://127.0.0.1./hook"}, {}, "webhook_url", "invalid_webhook_url"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, {}, "metadata", "invalid_metadata"),
        ({"metadata": {"count": 1}}, {}, "metadata", "invalid_metadata"),
        ({"metadata": ["a"]}, {}, "metadata", "invalid_metadata"),
        ({}, {"x-klein-deadline-ms": "soon"}, "x-klein-deadline-ms", "invalid_deadline"),
        ({"size": "3x3"}, {}, "size", None),
    ],
)
def test_bad_async_requests_get_a_400_and_nothing_is_queued(rig: Rig, extra: dict[str, Any], headers: dict[str, str], param: str, code: str | None) -> None:
    before = rig.fal()["generations"]
    resp = rig.submit("key-bad", {**BODY, **extra}, headers)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and (code is None or error["code"] == code)
    assert rig.http.get(f"{rig.url}/v1/images/jobs", headers=auth("key-bad")).json()["data"] == []
    assert rig.fal()["generations"] == before


# ---- webhooks ----------------------------------------------------------------


def test_webhook_gets_one_signed_delivery_verifiable_with_standardwebhooks(rig: Rig) -> None:
    with WebhookReceiver() as receiver:
        job = rig.submit("key-hook", {**BODY, "webhook_url": receiver.url, "metadata": {"batch": "b-7", "row": "12"}}).json()
        assert job["webhook"] == {"url": receiver.url, "attempts": 0, "delivered": False, "last_status": None}
        assert job["metadata"] == {"batch": "b-7", "row": "12"}
        deliveries = receiver.wait_for(1)
        time.sleep(0.5)  # no second delivery follows
        assert len(receiver.deliveries) == 1
    payload = standardwebhooks.Webhook(rig.secret).verify(deliveries[0].body, deliveries[0].headers)
    assert payload["event"] == "image.job.succeeded" and payload["id"] == job["id"] and payload["status"] == "succeeded"
    assert payload["metadata"] == {"batch": "b-7", "row": "12"} and payload["result"]["data"]
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_webhook_secret()).verify(deliveries[0].body, deliveries[0].headers)
    final = rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}", headers=auth("key-hook")).json()
    assert final["webhook"] == {"url": receiver.url, "attempts": 1, "delivered": True, "last_status": 204}


def test_a_receiver_that_fails_three_times_still_gets_the_delivery_with_a_stable_id(rig: Rig) -> None:
    with WebhookReceiver(statuses=[500, 503, 502]) as receiver:
        job = rig.submit("key-hook", {**BODY, "webhook_url": receiver.url}).json()
        deliveries = receiver.wait_for(4)
        time.sleep(0.5)
        assert len(receiver.deliveries) == 4 and receiver.answered == [500, 503, 502, 204]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1
    for d in deliveries:
        standardwebhooks.Webhook(rig.secret).verify(d.body, d.headers)
    final = rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}", headers=auth("key-hook")).json()
    assert final["webhook"]["attempts"] == 4 and final["webhook"]["delivered"] is True


def test_a_receiver_that_always_fails_is_given_up_after_the_schedule(rig: Rig) -> None:
    with WebhookReceiver(statuses=[500] * 10) as receiver:
        job = rig.submit("key-hook", {**BODY, "webhook_url": receiver.url}).json()
        receiver.wait_for(4)
        time.sleep(1.0)
        assert len(receiver.deliveries) == 4  # the first try and one per configured delay
    final = rig.http.get(f"{rig.url}/v1/images/jobs/{job['id']}", headers=auth("key-hook")).json()
    assert final["webhook"] == {"url": receiver.url, "attempts": 4, "delivered": False, "last_status": 500}


def test_canceling_a_job_sends_the_canceled_event(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 10_000}})
    with WebhookReceiver() as receiver:
        job = rig.submit("key-hook", {**BODY, "webhook_url": receiver.url}).json()
        rig.http.post(f"{rig.url}/v1/images/jobs/{job['id']}/cancel", headers=auth("key-hook"))
        deliveries = receiver.wait_for(1)
    assert standardwebhooks.Webhook(rig.secret).verify(deliveries[0].body, deliveries[0].headers)["event"] == "image.job.canceled"


# ---- idempotency (one process; across replicas in test_jobs_replicas.py) -----


def idem(key: str, caller: str = "key-idem") -> dict[str, str]:
    return {**auth(caller), "Idempotency-Key": key}


def test_the_same_key_and_body_replays_the_answer_with_no_new_spend(rig: Rig) -> None:
    before = rig.fal()["generations"]
    first = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem("order-1"))
    second = rig.http.post(f"{rig.url}/v1/images/generations", json=dict(reversed(BODY.items())), headers=idem("order-1"))
    assert first.status_code == second.status_code == 200
    assert "idempotent-replayed" not in first.headers and second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    spent_now = {k: v for k, v in second.headers.items() if k.startswith("x-klein-") and not k.startswith("x-klein-original-")}
    assert spent_now == {**{k: v for k, v in first.headers.items() if k.startswith("x-klein-")}, "x-klein-cost-usd": "0"}
    assert second.headers["x-klein-original-cost-usd"] == first.headers["x-klein-cost-usd"]
    assert rig.fal()["generations"] == before + 1


def test_the_same_key_with_a_different_body_is_a_422(rig: Rig) -> None:
    rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem("order-2"))
    resp = rig.http.post(f"{rig.url}/v1/images/generations", json={**BODY, "prompt": "another"}, headers=idem("order-2"))
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "idempotency_key_reused"


def test_the_same_key_while_the_first_runs_is_a_409(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 1500}})
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem("order-3"))))
    first.start()
    time.sleep(0.5)
    busy = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem("order-3"))
    first.join(timeout=20)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_key_in_use"
    assert busy.headers.get("x-should-retry") == "true"
    assert results[0].status_code == 200


def test_keys_are_per_caller(rig: Rig) -> None:
    before = rig.fal()["generations"]
    a = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem("shared", "key-idem"))
    b = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem("shared", "key-b"))
    assert "idempotent-replayed" not in b.headers and a.status_code == b.status_code == 200
    assert rig.fal()["generations"] == before + 2


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_a_bad_idempotency_key_is_a_400(rig: Rig, key: str) -> None:
    resp = rig.http.post(f"{rig.url}/v1/images/generations", json=BODY, headers=idem(key))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_idempotency_key"


def test_an_idempotent_async_create_gives_the_same_job_once(rig: Rig) -> None:
    first = rig.submit("key-idem", headers={"Idempotency-Key": "async-1"})
    second = rig.submit("key-idem", headers={"Idempotency-Key": "async-1"})
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"] and second.headers["location"] == first.headers["location"]
    assert second.headers["idempotent-replayed"] == "true"
    mine = rig.http.get(f"{rig.url}/v1/images/jobs", params={"limit": 100}, headers=auth("key-idem")).json()["data"]
    assert [j["id"] for j in mine].count(first.json()["id"]) == 1 and len(mine) == 1


def test_an_error_answer_is_replayed_too(rig: Rig) -> None:
    first = rig.http.post(f"{rig.url}/v1/images/generations", json={**BODY, "size": "3x3"}, headers=idem("bad-size"))
    second = rig.http.post(f"{rig.url}/v1/images/generations", json={**BODY, "size": "3x3"}, headers=idem("bad-size"))
    assert first.status_code == second.status_code == 400 and second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"


def test_job_metrics_are_exported(rig: Rig) -> None:
    text = rig.http.get(f"{rig.url}/metrics", headers=SCRAPE).text
    for name in ("klein_image_jobs_total", "klein_image_job_queue_depth", "klein_image_job_oldest_queued_age_seconds", "klein_webhook_deliveries_total", "klein_idempotency_requests_total"):
        assert name in text
    assert 'klein_image_jobs_total{status="succeeded"}' in text


def test_a_multipart_edit_runs_as_a_job_and_its_key_replays(rig: Rig) -> None:
    before = rig.fal()["generations"]
    files = {"image": ("ref.png", png_bytes(512, 512), "image/png")}
    fields = {"prompt": "make it night", "size": "512x512", "response_format": "b64_json", "metadata": '{"shot": "4"}'}
    headers = {**ASYNC, **idem("edit-1")}
    first = rig.http.post(f"{rig.url}/v1/images/edits", data=fields, files=files, headers=headers)
    again = rig.http.post(f"{rig.url}/v1/images/edits", data=fields, files={"image": ("other-name.png", png_bytes(512, 512), "image/png")}, headers=headers)
    assert first.status_code == again.status_code == 202, first.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    job = wait_job(rig.http, rig.url, first.json()["id"], headers=auth("key-idem"))
    assert job["status"] == "succeeded" and job["metadata"] == {"shot": "4"}
    assert image_size_of(base64.b64decode(job["result"]["data"][0]["b64_json"])) == (512, 512)
    assert rig.fal()["generations"] == before + 1
    changed = rig.http.post(f"{rig.url}/v1/images/edits", data=fields, files={"image": ("ref.png", png_bytes(512, 512, color=(1, 2, 3)), "image/png")}, headers=headers)
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"


def test_a_replica_runs_at_most_job_concurrency_jobs_and_exports_the_queue_depth(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 2500}})
    before = rig.fal()["generations"]
    ids = [rig.submit("key-busy", {**BODY, "prompt": f"frame {i}"}).json()["id"] for i in range(7)]
    time.sleep(1.3)  # the workers took what they could; the queue gauge refreshed
    assert rig.fal()["generations"] - before == 4  # job_concurrency in this rig
    statuses = [rig.http.get(f"{rig.url}/v1/images/jobs/{i}", headers=auth("key-busy")).json()["status"] for i in ids]
    assert sorted(statuses) == ["queued"] * 3 + ["running"] * 4

    def gauges() -> tuple[float, float]:
        lines = rig.http.get(f"{rig.url}/metrics", headers=SCRAPE).text.splitlines()
        depth = next(line for line in lines if line.startswith("klein_image_job_queue_depth "))
        age = next(line for line in lines if line.startswith("klein_image_job_oldest_queued_age_seconds "))
        return float(depth.split()[1]), float(age.split()[1])

    # The gauges are sampled once a second, so a scrape may show an older state;
    # the three jobs wait at least 2.5 s, so a sample of them comes within that.
    seen = gauges()
    deadline = time.monotonic() + 2
    while not (seen[0] == 3 and seen[1] > 0.8) and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = gauges()
    assert seen[0] == 3 and seen[1] > 0.8, seen
    for job_id in ids:
        assert wait_job(rig.http, rig.url, job_id, headers=auth("key-busy"))["status"] == "succeeded"


def test_the_callers_deadline_bounds_an_async_job(rig: Rig) -> None:
    rig.knobs({"job": {"queue_ms": 5000}})
    job = rig.submit("key-a", headers={"x-klein-deadline-ms": "1500"}).json()
    done = wait_job(rig.http, rig.url, job["id"], headers=auth("key-a"), timeout=15)
    assert done["status"] == "failed" and done["error"]["code"] == "deadline_exceeded"
    assert done["completed"] - done["created"] <= 4
