"""Images referred to by a job or an idempotent answer live as long as that record.

Images live `image_url_ttl_s` (1 h) while jobs live `job_retention_s` and
idempotent answers `idempotency_ttl_s` (24 h each): a stored image a record
refers to is kept for the record's lifetime (GatewaySettings.images_kept_s),
so a URL read from a job or a replay always serves. Checked with the shipped
defaults and a controllable clock on the image store and the job store.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.config import IMAGE_KEEP_SLACK_S, GatewaySettings
from tests.gateway_support import FakeAdapter, install_fakes, make_app

BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url", "model": "local/flux-2-klein-4b"}
DAY = 86400


class Clock:
    """Unix seconds that move only when a test moves them."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def local_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def expires_of(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["expires"][0])


def app_with_clock() -> tuple[Litestar, Clock]:
    app = make_app()
    install_fakes(app, {"local": FakeAdapter("local")})
    clock = Clock(time.time())
    gw = app.state.gateway
    gw.images_store.clock = clock
    gw.jobs.store.clock = clock
    return app, clock


@pytest.mark.parametrize(
    ("image_ttl_s", "record_ttl_s", "kept_s"),
    [
        (3600, DAY, DAY + IMAGE_KEEP_SLACK_S),  # the shipped defaults: images outlive the record
        (3600, 60.5, 3600),  # a record shorter than the image TTL changes nothing
        (60, 59.2, 60 + IMAGE_KEEP_SLACK_S),  # fractions round up, then the slack
    ],
)
def test_images_are_kept_past_the_record_that_refers_to_them(image_ttl_s: int, record_ttl_s: float, kept_s: int) -> None:
    assert GatewaySettings(image_url_ttl_s=image_ttl_s).images_kept_s(record_ttl_s) == kept_s


async def test_a_jobs_image_url_still_serves_at_the_jobs_last_readable_moment() -> None:
    app, clock = app_with_clock()
    start = clock.now
    retention = app.state.gateway.config.settings.job_retention_s
    async with AsyncTestClient(app) as client:
        accepted = await client.post("/v1/images/generations", json=BODY, headers={"Prefer": "respond-async"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        for _ in range(200):
            job = (await client.get(f"/v1/images/jobs/{job_id}")).json()
            if job["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.02)
        assert job["status"] == "succeeded", job
        url = job["result"]["data"][0]["url"]
        # The job store's clock stood still: the record is readable until start + retention.
        clock.now = start + retention - 0.001
        assert (await client.get(f"/v1/images/jobs/{job_id}")).status_code == 200
        image = await client.get(local_path(url))
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        clock.now = start + retention
        assert (await client.get(f"/v1/images/jobs/{job_id}")).status_code == 404  # the last moment was the one before


async def test_an_idempotent_answers_image_url_serves_as_long_as_the_answer_is_replayed() -> None:
    app, clock = app_with_clock()
    start = clock.now
    ttl = app.state.gateway.config.settings.idempotency_ttl_s
    headers = {"Idempotency-Key": "batch-7-row-12"}
    async with AsyncTestClient(app) as client:
        first = await client.post("/v1/images/generations", json=BODY, headers=headers)
        replay = await client.post("/v1/images/generations", json=BODY, headers=headers)
        assert first.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        url = replay.json()["data"][0]["url"]
        assert url == first.json()["data"][0]["url"]
        # The answer was stored a moment after `start` and is replayed for `ttl`; a second covers that moment.
        clock.now = start + ttl + 1
        assert (await client.get(local_path(url))).status_code == 200


async def test_an_ordinary_answers_image_keeps_the_image_ttl() -> None:
    app, clock = app_with_clock()
    start = clock.now
    ttl = app.state.gateway.config.settings.image_url_ttl_s
    async with AsyncTestClient(app) as client:
        answer = await client.post("/v1/images/generations", json=BODY)
        assert answer.status_code == 200, answer.text
        url = answer.json()["data"][0]["url"]
        assert expires_of(url) == int(start) + ttl
        clock.now = start + ttl + 1
        assert (await client.get(local_path(url))).status_code == 404
