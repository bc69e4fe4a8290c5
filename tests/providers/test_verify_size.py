"""`verify_size`: a URL image's size is checked without downloading the image.

`header` reads the first 64 KB with a Range request, `reported` trusts the
width and height a provider's answer reports, `off` trusts the request. A
wrong size never reaches the caller under `header` or `reported`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import httpx
import pytest
import respx
from PIL import Image

from gateway.dispatch.delivery import HEAD_BYTES, ResultShaper
from gateway.domain.job import ImageJob
from gateway.images.memory import MemoryImageStore
from gateway.images.signing import UrlSigner
from gateway.providers.base import FailureClass, GeneratedImage, ProviderError
from gateway.providers.empiriolabs import EmpirioLabsAdapter
from gateway.providers.fal import FalAdapter
from gateway.providers.options import AdapterOptions
from gateway.providers.replicate import ReplicateAdapter
from gateway.providers.runflow import RunflowAdapter
from tests.providers import test_empiriolabs as el
from tests.providers import test_fal as fal

IMAGE_URL = "https://cdn.provider.test/out.png"


def png(width: int, height: int, noise: bool = True) -> bytes:
    """A PNG well over HEAD_BYTES when noisy, so reading it whole would show."""
    import os

    im = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)) if noise else Image.new("RGB", (width, height))
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=1)
    return out.getvalue()


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("adapter_type", "default"),
    [(FalAdapter, "reported"), (RunflowAdapter, "reported"), (ReplicateAdapter, "header"), (EmpirioLabsAdapter, "header")],
)
def test_default_is_reported_only_where_the_protocol_documents_a_size(adapter_type, default):
    assert adapter_type.options_type.parse({}, adapter_type.kind).verify_size == default


def test_an_unknown_policy_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="option verify_size must be one of header, reported, off"):
        AdapterOptions.parse({"verify_size": "sometimes"}, "fal")


@pytest.mark.parametrize(("policy", "size"), [("reported", (1024, 1024)), ("header", (None, None)), ("off", (768, 512))])
async def test_policy_decides_which_size_the_adapter_vouches_for(policy, size, mock, make_settings, make_job, deadline):
    """fal reports 1024x1024 for a 768x512 request: `reported` keeps the report
    (the shaper then refuses it), `header` leaves it to be read, `off` stamps the request."""
    fal.happy_queue(mock)
    async with httpx.AsyncClient() as client:
        adapter = FalAdapter(make_settings("fal", fal.BASE, fal.KEY, verify_size=policy), client)
        [image] = (await adapter.generate(make_job(width=768, height=512), deadline)).images
    assert (image.width, image.height) == size


async def test_empiriolabs_answer_is_checked_by_header_by_default(mock, make_settings, make_job, deadline):
    mock.post(el.GEN).respond(200, json={"created": 1, "data": [{"url": IMAGE_URL}]})
    async with httpx.AsyncClient() as client:
        [image] = (await EmpirioLabsAdapter(make_settings("empiriolabs", el.BASE, el.KEY), client).generate(make_job(), deadline)).images
    assert (image.url, image.width, image.height) == (IMAGE_URL, None, None)


async def shape(job: ImageJob, image: GeneratedImage) -> tuple[str, MemoryImageStore]:
    store = MemoryImageStore(ttl_s=60, max_bytes=64 << 20, signer=UrlSigner())
    async with httpx.AsyncClient() as client:
        [shaped] = await ResultShaper(client, store).shape(job, [image], backend="x", deadline=time.monotonic() + 5, base_url="http://gw.test")
    return shaped.url or "", store


def url_image(width: int | None = None, height: int | None = None) -> GeneratedImage:
    return GeneratedImage(url=IMAGE_URL, content_type="image/png", width=width, height=height)


@pytest.mark.parametrize("server_honours_range", [True, False], ids=["206-partial", "200-whole-body"])
async def test_header_check_passes_the_url_on_after_reading_only_the_head(server_honours_range: bool, mock: respx.MockRouter, make_job: Callable[..., ImageJob]) -> None:
    body = png(1024, 1024)
    assert len(body) > 10 * HEAD_BYTES
    reply = httpx.Response(206, content=body[:HEAD_BYTES], headers={"content-range": f"bytes 0-{HEAD_BYTES - 1}/{len(body)}"}) if server_honours_range else httpx.Response(200, content=body)
    route = mock.get(IMAGE_URL).mock(return_value=reply)

    url, store = await shape(make_job(response_format="url", output_format="png"), url_image())

    assert url == IMAGE_URL  # the provider's URL, not one the gateway serves
    assert route.call_count == 1 and route.calls.last.request.headers["range"] == f"bytes=0-{HEAD_BYTES - 1}"
    assert len(store._items) == 0  # nothing downloaded and re-hosted


async def test_a_wrong_size_in_the_header_is_a_billed_failure(mock: respx.MockRouter, make_job: Callable[..., ImageJob]) -> None:
    mock.get(IMAGE_URL).respond(206, content=png(512, 512)[:HEAD_BYTES])
    with pytest.raises(ProviderError) as info:
        await shape(make_job(response_format="url", output_format="png"), url_image())
    assert (info.value.failure, info.value.billed) == (FailureClass.DELIVERY_FAILED, True)  # billed once, bought again elsewhere
    assert "returned 512x512, not the requested 1024x1024" in info.value.message


async def test_a_url_whose_bytes_are_another_format_is_downloaded_and_transcoded(mock: respx.MockRouter, make_job: Callable[..., ImageJob]) -> None:
    data = jpeg(1024, 1024)  # served under a .png name
    route = mock.get(IMAGE_URL).respond(200, content=data)
    url, store = await shape(make_job(response_format="url", output_format="png"), url_image())
    assert url.startswith("http://gw.test/") and route.call_count == 2  # head, then the whole image
    [stored] = store._items.values()
    assert stored.data.startswith(b"\x89PNG")


async def test_an_unreadable_head_falls_back_to_a_checked_download(mock: respx.MockRouter, make_job: Callable[..., ImageJob]) -> None:
    route = mock.get(IMAGE_URL).mock(side_effect=[httpx.Response(416), httpx.Response(200, content=png(1024, 1024, noise=False))])
    url, store = await shape(make_job(response_format="url", output_format="png"), url_image())
    assert route.call_count == 2 and url.startswith("http://gw.test/") and len(store._items) == 1


async def test_a_vouched_size_is_passed_on_unread(mock: respx.MockRouter, make_job: Callable[..., ImageJob]) -> None:
    route = mock.get(IMAGE_URL).respond(200, content=png(512, 512))
    url, _ = await shape(make_job(response_format="url", output_format="png"), url_image(1024, 1024))
    assert url == IMAGE_URL and not route.called


async def test_a_reported_wrong_size_is_never_passed_on(mock: respx.MockRouter, make_job: Callable[..., ImageJob]) -> None:
    mock.get(IMAGE_URL).respond(200, content=png(512, 512, noise=False))
    with pytest.raises(ProviderError, match="not the requested 1024x1024"):
        await shape(make_job(response_format="url", output_format="png"), url_image(512, 512))
