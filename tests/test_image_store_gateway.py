"""Url answers through each image store, end to end in the app: the signed
fetch, the store's presigned URLs, re-hosted provider images, and images that
survive a restart of the gateway (the s3 store on a loopback S3 server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.domain.job import ImageJob
from gateway.observability.metrics import GatewayMetrics
from gateway.providers.base import GeneratedImage, ProviderResult
from tests.gateway_support import ENV, PROVIDERS_YAML, REPO, FakeAdapter, image_size_of, install_fakes, png_bytes
from tests.s3_server import S3Endpoint

BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url", "model": "local/flux-2-klein-4b"}
KEY = {"KLEIN_URL_SIGNING_KEY": "shared-by-every-replica-" + "0" * 16}


def app_with(tmp_path: Path, env: dict[str, str], image_store: dict[str, Any] | None = None, transport: httpx.AsyncBaseTransport | None = None) -> Litestar:
    config = PROVIDERS_YAML
    if image_store:
        raw = yaml.safe_load(PROVIDERS_YAML.read_text())
        raw["gateway"]["image_store"] = image_store
        config = tmp_path / "providers.yaml"
        config.write_text(yaml.safe_dump(raw))
    app = create_app(config, REPO / "pricing", env={**ENV, **env}, transport=transport, probes=False, metrics=GatewayMetrics(registry=CollectorRegistry()))
    install_fakes(app, {"local": FakeAdapter("local")})
    return app


def local_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def generate_urls(app: Litestar, n: int = 1) -> list[str]:
    async with AsyncTestClient(app) as client:
        resp = await client.post("/v1/images/generations", json={**BODY, "n": n})
        assert resp.status_code == 200, resp.text
        return [d["url"] for d in resp.json()["data"]]


async def fetch(app: Litestar, url: str) -> httpx.Response:
    async with AsyncTestClient(app) as client:
        return await client.get(local_path(url))


@pytest.mark.parametrize("kind", ["memory", "filesystem", "s3"])
async def test_a_url_answer_for_bytes_is_fetched_from_the_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = {"KLEIN_IMAGE_STORE": kind, "KLEIN_IMAGE_DIR": str(tmp_path / "images")}
    if kind == "s3":
        env = request.getfixturevalue("s3_bucket").env(**KEY)
    app = app_with(tmp_path, env)
    urls = await generate_urls(app, n=2)
    assert len(set(urls)) == 2
    for url in urls:
        got = await fetch(app, url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert image_size_of(got.content) == (512, 512)
    tampered = urls[0].replace("sig=", "sig=f")
    bad = await fetch(app, tampered)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "image_not_found"


async def test_s3_images_survive_a_gateway_restart(tmp_path: Path, s3_bucket: S3Endpoint) -> None:
    first = app_with(tmp_path, s3_bucket.env(**KEY))
    urls = await generate_urls(first)
    await first.state.gateway.close()
    restarted = app_with(tmp_path, s3_bucket.env(**KEY))
    got = await fetch(restarted, urls[0])
    assert got.status_code == 200 and image_size_of(got.content) == (512, 512)
    other_key = app_with(tmp_path, s3_bucket.env(KLEIN_URL_SIGNING_KEY="a-different-key-" + "1" * 16))
    assert (await fetch(other_key, urls[0])).status_code == 404


async def test_filesystem_images_survive_a_restart_without_a_configured_key(tmp_path: Path) -> None:
    env = {"KLEIN_IMAGE_STORE": "filesystem", "KLEIN_IMAGE_DIR": str(tmp_path / "images")}
    urls = await generate_urls(app_with(tmp_path, env))
    got = await fetch(app_with(tmp_path, env), urls[0])
    assert got.status_code == 200


async def test_presigned_urls_point_at_the_bucket_and_download_the_image(tmp_path: Path, s3_bucket: S3Endpoint) -> None:
    app = app_with(tmp_path, s3_bucket.env(KLEIN_IMAGE_URL_MODE="presigned"))
    (url,) = await generate_urls(app)
    assert url.startswith(f"{s3_bucket.url}/{s3_bucket.bucket}/klein/images/") and "X-Amz-Signature=" in url
    async with httpx.AsyncClient() as client:
        got = await client.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert image_size_of(got.content) == (512, 512)


class HostedAdapter(FakeAdapter):
    """A provider that answers with a URL on its own CDN, as Runflow's presigned ones."""

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        self.calls.append(job)
        return ProviderResult(images=[GeneratedImage(url="https://cdn.provider.test/out/1.png", content_type="image/png", width=job.width, height=job.height)])


@pytest.mark.parametrize(("rehost", "served_by_gateway"), [(False, False), (True, True)], ids=["pass-through", "rehost"])
async def test_rehost_copies_provider_images_into_the_store(tmp_path: Path, rehost: bool, served_by_gateway: bool) -> None:
    image = png_bytes(512, 512)
    downloads: list[str] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        downloads.append(str(request.url))
        return httpx.Response(200, content=image, headers={"content-type": "image/png"})

    app = app_with(tmp_path, {"KLEIN_IMAGE_STORE": "filesystem", "KLEIN_IMAGE_DIR": str(tmp_path / "images")}, {"rehost": rehost}, transport=httpx.MockTransport(cdn))
    install_fakes(app, {"local": HostedAdapter("local")})
    (url,) = await generate_urls(app)
    assert url.startswith("https://cdn.provider.test/") is not served_by_gateway
    assert len(downloads) == (1 if rehost else 0)
    if served_by_gateway:
        got = await fetch(app, url)
        assert got.status_code == 200 and got.content == image
