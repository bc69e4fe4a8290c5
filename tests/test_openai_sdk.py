"""The official openai SDK against the gateway served by uvicorn on 127.0.0.1.

Upstream is fal's queue protocol mocked with respx (docs/providers/fal.md):
submit, status, result, and a CDN serving real images of the asked size and
format. Only fal has a credential, so every request goes there.
"""

from __future__ import annotations

import base64
import io
import itertools
import json

import httpx
import openai
import pytest
import respx
from PIL import Image

from tests.gateway_support import ServerThread, image_size_of, make_app, png_bytes

FAL = "http://fal.test"
CDN = "http://cdn.test"
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def fal_router() -> respx.Router:
    """fal's queue protocol: submit -> COMPLETED -> result, images on a CDN."""
    router = respx.Router(assert_all_called=False)
    jobs: dict[str, dict] = {}
    ids = itertools.count(1)

    def submit(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"].startswith("Key ")
        body = json.loads(request.content)
        rid = f"req-{next(ids)}"
        jobs[rid] = body
        base = f"{FAL}/fal-ai/flux-2/requests/{rid}"
        return httpx.Response(200, json={"request_id": rid, "status": "IN_QUEUE", "queue_position": 0, "status_url": base + "/status", "response_url": base, "cancel_url": base + "/cancel"})

    def status(request: httpx.Request, rid: str) -> httpx.Response:
        return httpx.Response(200, json={"status": "COMPLETED", "request_id": rid, "logs": None, "metrics": {"inference_time": 0.3}})

    def result(request: httpx.Request, rid: str) -> httpx.Response:
        body = jobs[rid]
        size = body["image_size"]
        fmt = body.get("output_format", "png")
        images = []
        for i in range(body.get("num_images", 1)):
            if body.get("sync_mode"):
                data = png_bytes(size["width"], size["height"], FORMATS[fmt])
                url = f"data:{MEDIA[fmt]};base64," + base64.b64encode(data).decode()
            else:
                url = f"{CDN}/{size['width']}x{size['height']}/{i}.{fmt}"
            images.append({"url": url, "content_type": MEDIA[fmt], "width": size["width"], "height": size["height"]})
        return httpx.Response(200, json={"images": images, "seed": 1234, "has_nsfw_concepts": [False] * len(images), "prompt": body["prompt"]})

    def cdn(request: httpx.Request, w: str, h: str, fmt: str) -> httpx.Response:
        return httpx.Response(200, content=png_bytes(int(w), int(h), FORMATS[fmt]), headers={"content-type": MEDIA[fmt]})

    router.post(url__regex=rf"^{FAL}/fal-ai/flux-2/klein/4b(/edit)?$").mock(side_effect=submit)
    router.get(url__regex=rf"^{FAL}/fal-ai/flux-2/requests/(?P<rid>[^/]+)/status").mock(side_effect=status)
    router.get(url__regex=rf"^{FAL}/fal-ai/flux-2/requests/(?P<rid>[^/]+)$").mock(side_effect=result)
    router.get(url__regex=rf"^{CDN}/(?P<w>\d+)x(?P<h>\d+)/\d+\.(?P<fmt>\w+)$").mock(side_effect=cdn)
    router.jobs = jobs  # type: ignore[attr-defined]  # the tests read what the mock router recorded
    return router


@pytest.fixture(scope="module")
def served():
    router = fal_router()
    app = make_app({"FAL_KEY": "fal-secret-key", "KLEIN_FAL_BASE_URL": FAL}, transport=httpx.MockTransport(router.async_handler))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
        fetch = httpx.Client(transport=httpx.MockTransport(router.handler))
        yield client, fetch, router, server
        fetch.close()


def decoded(item, fetch: httpx.Client, server) -> bytes:
    if item.b64_json:
        return base64.b64decode(item.b64_json)
    url = item.url
    if url.startswith(server.url):
        return httpx.get(url).content
    return fetch.get(url).content


def image_format(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return im.format


CASES = [
    ("url_png_one", "url", "png", 1, "512x512"),
    ("b64_png_four", "b64_json", "png", 4, "512x512"),
    ("url_jpeg_four", "url", "jpeg", 4, "768x1024"),
    ("b64_webp_one", "b64_json", "webp", 1, "1024x576"),
    ("b64_jpeg_one", "b64_json", "jpeg", 1, "1024x1024"),
]


@pytest.mark.parametrize("label,response_format,fmt,n,size", CASES, ids=[c[0] for c in CASES])
def test_sdk_generate_returns_decodable_images_of_the_requested_size(served, label, response_format, fmt, n, size):
    client, fetch, _, server = served
    raw = client.images.with_raw_response.generate(model="flux-2-klein-4b", prompt="a lighthouse", size=size, n=n, response_format=response_format, extra_body={"output_format": fmt})
    result = raw.parse()
    assert raw.headers["x-klein-backend"] == "fal"
    assert raw.headers["x-klein-attempts"] == "1"
    assert float(raw.headers["x-klein-cost-usd"]) > 0
    assert len(result.data) == n
    w, h = (int(v) for v in size.split("x"))
    for item in result.data:
        data = decoded(item, fetch, server)
        assert image_size_of(data) == (w, h)
        assert image_format(data) == FORMATS[fmt]


@pytest.mark.parametrize("count", [1, 3])
def test_sdk_edit_sends_every_reference_image(served, count):
    client, _fetch, router, _server = served
    files = [(f"ref{i}.png", png_bytes(320, 240 + 16 * i), "image/png") for i in range(count)]
    image = files[0] if count == 1 else files
    result = client.images.edit(model="flux-2-klein-4b", image=image, prompt="make it night", size="512x512", response_format="b64_json")
    assert len(result.data) == 1
    assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (512, 512)
    last = list(router.jobs.values())[-1]
    assert len(last["image_urls"]) == count
    assert all(u.startswith("data:image/png;base64,") for u in last["image_urls"])


def test_sdk_sees_openai_errors_as_exceptions(served):
    client, *_ = served
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux-2-klein-4b", prompt="x", size="1000x1000")
    assert exc.value.code == "invalid_size"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")
    assert client.models.retrieve("flux-2-klein-4b").id == "flux-2-klein-4b"
