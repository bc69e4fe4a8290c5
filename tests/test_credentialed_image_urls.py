"""A provider image URL that carries a credential is never handed to a caller.

Replicate answers with an output URL holding a key (its own, in any spelling,
or a signed grant); the gateway fetches the image and serves it from its
own store instead, or fails the delivery when the fetch fails.
"""

from __future__ import annotations

import base64

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from gateway.redaction import register_secrets, url_carries_credential
from tests.gateway_support import make_app, png_bytes
from tests.test_secrets import BASES, CALLER_KEY, ENV, KEYS

TOKEN = KEYS["REPLICATE_API_TOKEN"]
CDN = "https://replicate.delivery/out/1.png"

CREDENTIALED = {
    "token-param": f"{CDN}?token={TOKEN}",
    "key-param": f"{CDN}?key=abc123",
    "access_token-param": f"{CDN}?access_token=zzz",
    "signature-param": f"{CDN}?signature=abcdef",
    "sig-param": f"{CDN}?se=2026&sig=abcdef",
    "amz-signature": f"{CDN}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=0a1b2c",
    "password-in-url": "https://user:pw@replicate.delivery/out/1.png",
    "key-in-path": f"https://replicate.delivery/{TOKEN}/1.png",
    "base64-key-in-query": f"{CDN}?grant={base64.urlsafe_b64encode(TOKEN.encode()).decode()}",
    "hex-key-in-query": f"{CDN}?grant={TOKEN.encode().hex()}",
    "bearer-b64-in-query": f"{CDN}?h={base64.b64encode(b'Bearer ' + TOKEN.encode()).decode()}",
}


@pytest.mark.parametrize("url", CREDENTIALED.values(), ids=CREDENTIALED)
def test_a_credentialed_url_is_recognised(url):
    register_secrets([TOKEN])  # as the gateway does at start
    assert url_carries_credential(url)


@pytest.mark.parametrize("url", [CDN, f"{CDN}?width=1024&format=png", "https://replicate.delivery/pbxt/abc/out-0.png"])
def test_a_plain_url_is_not_taken_for_a_credentialed_one(url):
    assert not url_carries_credential(url)


def replicate_answering(output_url: str, cdn_status: int = 200) -> tuple[respx.Router, list[str]]:
    downloads: list[str] = []
    router = respx.Router(assert_all_called=False)
    done = {"id": "p-1", "status": "succeeded", "output": [output_url], "started_at": "2026-01-01T00:00:00Z", "metrics": {"predict_time": 1.0}}
    router.post(url__startswith=BASES["replicate"]).mock(return_value=httpx.Response(201, json=done))
    router.get(url__startswith=BASES["replicate"]).mock(return_value=httpx.Response(200, json=done))

    def cdn(request: httpx.Request) -> httpx.Response:
        downloads.append(str(request.url))
        if cdn_status != 200:
            return httpx.Response(cdn_status, text=f"denied for {TOKEN}")
        return httpx.Response(200, content=png_bytes(1024, 1024), headers={"content-type": "image/png"})

    router.route(host="replicate.delivery").mock(side_effect=cdn)
    return router, downloads


async def generate(router: respx.Router) -> tuple[httpx.Response, httpx.Response | None]:
    app = make_app(ENV, transport=httpx.MockTransport(router.async_handler))
    async with AsyncTestClient(app) as client:
        answer = await client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse at dusk", "size": "1024x1024", "response_format": "url", "provider": {"only": ["replicate"]}},
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        )
        image = None
        if answer.status_code == 200:
            served = httpx.URL(answer.json()["data"][0]["url"])
            image = await client.get(served.raw_path.decode())
    return answer, image


@pytest.mark.parametrize("url", CREDENTIALED.values(), ids=CREDENTIALED)
async def test_a_credentialed_image_url_is_rehosted_by_the_gateway(url):
    router, downloads = replicate_answering(url)
    answer, image = await generate(router)
    assert answer.status_code == 200, answer.text
    served = answer.json()["data"][0]["url"]
    assert "replicate.delivery" not in served and TOKEN not in answer.text
    assert len(downloads) == 1
    assert image is not None and image.status_code == 200 and image.headers["content-type"] == "image/png"


async def test_a_credentialed_image_url_that_cannot_be_fetched_fails_the_delivery():
    router, downloads = replicate_answering(CREDENTIALED["token-param"], cdn_status=403)
    answer, _ = await generate(router)
    assert answer.status_code >= 500, answer.text
    attempts = answer.json()["error"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["delivery_failed"]
    assert "replicate.delivery" not in answer.text and TOKEN not in answer.text and "denied" not in answer.text
    assert downloads


async def test_a_plain_image_url_still_passes_through():
    router, _ = replicate_answering(CDN)
    answer, _ = await generate(router)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"][0]["url"] == CDN
