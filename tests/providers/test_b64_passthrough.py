"""Base64 from a provider reaches a `b64_json` caller byte for byte.

When the image is already in the asked format and size, the gateway hands the
provider's base64 string on as it came: no decode of the whole image, no
re-encode (for a 1 MB image that was most of the gateway's CPU per request).
Each adapter that can answer with base64 is driven through its documented wire
shape (respx) and then through the result shaper, as a request is.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import respx
from PIL import Image

from gateway.dispatch import delivery as results
from gateway.dispatch.delivery import ResultShaper
from gateway.domain.job import ImageJob
from gateway.images.memory import MemoryImageStore
from gateway.images.signing import UrlSigner
from gateway.providers._images import HEAD_B64_CHARS
from gateway.providers.base import Adapter, AdapterSettings
from gateway.providers.empiriolabs import EmpirioLabsAdapter
from gateway.providers.fal import FalAdapter
from gateway.providers.local import LocalAdapter
from gateway.providers.replicate import ReplicateAdapter
from gateway.providers.runflow import RunflowAdapter
from tests.providers import test_empiriolabs as el
from tests.providers import test_fal as fal
from tests.providers import test_local as local
from tests.providers import test_replicate as rep
from tests.providers import test_runflow as rf


def noisy_png(width: int = 1024, height: int = 1024) -> bytes:
    """A PNG that does not compress: about 3 MB, so a whole-image pass would show."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, "PNG", compress_level=1)
    return out.getvalue()


PNG = noisy_png()
B64 = base64.b64encode(PNG).decode()
DATA_URI = "data:image/png;base64," + B64


def wire_local(mock: respx.MockRouter) -> None:
    mock.post(local.GEN).respond(200, json=local.generated(local.image(7, data=PNG)))


def wire_empiriolabs(mock: respx.MockRouter) -> None:
    mock.post(el.GEN).respond(200, json={"created": 1, "data": [{"b64_json": B64}]})


def wire_empiriolabs_data_uri(mock: respx.MockRouter) -> None:
    mock.post(el.GEN).respond(200, json={"created": 1, "data": [{"b64_json": DATA_URI}]})


def wire_fal(mock: respx.MockRouter) -> None:
    fal.happy_queue(mock, result=fal.output(url=DATA_URI))


def wire_replicate(mock: respx.MockRouter) -> None:
    mock.post(rep.CREATE).respond(201, json=rep.prediction(output=[DATA_URI]))


def wire_runflow(mock: respx.MockRouter) -> None:
    mock.post(rf.T2I).respond(200, json=rf.succeeded(outputs=[{"url": DATA_URI, "type": "image", "width": 1024, "height": 1024}]))


ADAPTERS: list[tuple[type[Adapter], str, str | None, Callable[[respx.MockRouter], None]]] = [
    (LocalAdapter, local.BASE + "/", None, wire_local),
    (EmpirioLabsAdapter, el.BASE, el.KEY, wire_empiriolabs),
    (EmpirioLabsAdapter, el.BASE, el.KEY, wire_empiriolabs_data_uri),
    (FalAdapter, fal.BASE, fal.KEY, wire_fal),
    (ReplicateAdapter, rep.BASE, rep.TOKEN, wire_replicate),
    (RunflowAdapter, rf.BASE, rf.KEY, wire_runflow),
]


@pytest.mark.parametrize(("adapter_type", "base", "key", "wire"), ADAPTERS, ids=["local", "empiriolabs", "empiriolabs-data-uri", "fal", "replicate", "runflow"])
async def test_provider_base64_reaches_the_caller_byte_for_byte(
    adapter_type: type[Adapter],
    base: str,
    key: str | None,
    wire: Callable[[respx.MockRouter], None],
    make_settings: Callable[..., AdapterSettings],
    make_job: Callable[..., ImageJob],
    mock: respx.MockRouter,
) -> None:
    wire(mock)
    job = make_job(response_format="b64_json", output_format="png")
    async with httpx.AsyncClient() as client:
        adapter: Any = adapter_type(make_settings(adapter_type.kind, base, key), client)
        result = await adapter.generate(job, time.monotonic() + 5)
        [image] = result.images
        assert image.data is None and image.b64 == B64  # kept as sent, never decoded whole
        [shaped] = await ResultShaper(client, MemoryImageStore(ttl_s=60, max_bytes=1 << 20, signer=UrlSigner())).shape(
            job, result.images, backend=adapter_type.kind, deadline=time.monotonic() + 5, base_url="http://gw.test"
        )
    assert shaped.b64_json is image.b64  # the very string: no re-encode on the way out
    assert base64.b64decode(shaped.as_openai()["b64_json"]) == PNG


@pytest.mark.parametrize(("output_format", "size"), [("jpeg", (1024, 1024)), ("png", (512, 512))], ids=["other-format-transcoded", "wrong-size-refused"])
async def test_base64_that_does_not_fit_the_request_takes_the_checked_path(
    output_format: str, size: tuple[int, int], make_settings: Callable[..., AdapterSettings], make_job: Callable[..., ImageJob], mock: respx.MockRouter
) -> None:
    """Pass-through is only for the asked format and size: a JPEG request gets a
    transcode, and a size the provider got wrong is a failure, not passed on."""
    wire_empiriolabs(mock)
    job = make_job(response_format="b64_json", output_format=output_format, width=size[0], height=size[1])
    async with httpx.AsyncClient() as client:
        result = await EmpirioLabsAdapter(make_settings("empiriolabs", el.BASE, el.KEY), client).generate(job, time.monotonic() + 5)
        shaper = ResultShaper(client, MemoryImageStore(ttl_s=60, max_bytes=1 << 20, signer=UrlSigner()))
        if size != (1024, 1024):
            with pytest.raises(Exception, match="not the requested 512x512"):
                await shaper.shape(job, result.images, backend="empiriolabs", deadline=time.monotonic() + 5, base_url="http://gw.test")
            return
        [shaped] = await shaper.shape(job, result.images, backend="empiriolabs", deadline=time.monotonic() + 5, base_url="http://gw.test")
    with Image.open(io.BytesIO(base64.b64decode(shaped.b64_json or ""))) as im:
        assert (im.format, im.size) == ("JPEG", (1024, 1024))


async def test_the_head_the_adapter_checked_is_the_head_pass_through_would_decode(make_settings: Callable[..., AdapterSettings], make_job: Callable[..., ImageJob], mock: respx.MockRouter) -> None:
    """EmpirioLabs hands the shaper the head it decoded to check and sniff the
    base64, so the shaper does not decode those 64 KB again: it must be exactly
    what the shaper would have decoded, and decide the same."""
    wire_empiriolabs(mock)
    job = make_job(response_format="b64_json", output_format="png")
    async with httpx.AsyncClient() as client:
        result = await EmpirioLabsAdapter(make_settings("empiriolabs", el.BASE, el.KEY), client).generate(job, time.monotonic() + 5)
    [image] = result.images
    assert results.HEAD_B64 == HEAD_B64_CHARS
    assert image.b64 is not None and image.b64_head == base64.b64decode(image.b64[: results.HEAD_B64], validate=True)
    assert image == dataclasses.replace(image, b64_head=None)  # the head takes no part in comparing images
    for other in (job, make_job(response_format="b64_json", output_format="png", width=512, height=512)):
        assert results.pass_through(image.b64, "image/png", other, image.b64_head) == results.pass_through(image.b64, "image/png", other)
