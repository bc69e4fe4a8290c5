"""The tiny pipeline served by uvicorn on 127.0.0.1, over real sockets: batching
under concurrent load, the gateway's adapter against the real service, and the
`python -m local_backend serve --tiny` command in its own process."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import uvicorn

from gateway.domain.job import ImageJob, JobKind, ReferenceImage
from gateway.providers.base import AdapterSettings, PreviewImage, PreviewSink, preview_sink
from gateway.providers.local import LocalAdapter
from local_backend.app import create_app
from tests.local_backend.conftest import make_settings
from tests.local_backend.test_app import png_b64

REPO = Path(__file__).resolve().parents[2]
BODY = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2}


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the service exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the service did not become ready in time")


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    """The tiny pipeline behind uvicorn, in a thread of this process."""
    app = create_app(make_settings(batch_delay_ms=150, gpu_usd_per_hour=2.5))
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, timeout=60)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_concurrent_requests_share_pipeline_calls(service_url: str) -> None:
    count = 8
    async with httpx.AsyncClient(base_url=service_url, timeout=30) as client:
        before = metric((await client.get("/metrics")).text, "local_backend_forwards_total")
        responses = await asyncio.gather(*(client.post("/v1/images/generations", json={**BODY, "prompt": f"p{n}", "seed": n}) for n in range(count)))
        after = metric((await client.get("/metrics")).text, "local_backend_forwards_total")
    assert [r.status_code for r in responses] == [200] * count
    assert [r.json()["seed"] for r in responses] == list(range(count))
    assert 1 <= after - before < count
    assert max(r.json()["timings"]["batch_size"] for r in responses) > 1


def adapter(url: str) -> tuple[LocalAdapter, httpx.AsyncClient]:
    client = httpx.AsyncClient()
    return LocalAdapter(AdapterSettings(name="local", base_url=url, credential=None), client), client


async def test_the_gateway_adapter_against_the_real_service(service_url: str) -> None:
    local, client = adapter(service_url)
    async with client:
        probe = await local.probe()
        reference = ReferenceImage("image/png", data=base64.b64decode(png_b64()))
        edit = ImageJob(kind=JobKind.EDIT, prompt="make it blue", width=64, height=64, n=2, steps=2, seed=11,
                        output_format="webp", references=(reference,))  # fmt: skip
        result = await local.generate(edit, deadline=time.monotonic() + 30)
    assert probe.ok and probe.live["estimated_wait_s"] == 0.0
    assert probe.live["marginal_usd_per_image"] > 0
    assert [image.seed for image in result.images] == [11, 12] and result.seed == 11
    assert all(base64.b64decode(image.b64)[:4] == b"RIFF" and image.content_type == "image/webp" for image in result.images)
    assert result.reported_cost_usd is not None and result.reported_cost_usd > 0


async def test_the_gateway_adapter_streams_previews_from_the_real_service(service_url: str) -> None:
    """Over a real socket: the previews reach the sink as the loop makes them,
    before the result, and the result is the plain request's."""
    local, client = adapter(service_url)
    got: list[tuple[PreviewImage, float]] = []
    job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=64, height=64, n=2, steps=4, seed=21)
    async with client:
        token = preview_sink.set(PreviewSink(2, lambda p: got.append((p, time.monotonic()))))
        try:
            streamed = await local.generate(job, deadline=time.monotonic() + 30)
        finally:
            preview_sink.reset(token)
        returned = time.monotonic()
        plain = await local.generate(job, deadline=time.monotonic() + 30)
    assert sorted((p.index, p.partial_image_index) for p, _ in got) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(p.data[:4] == b"\x89PNG" and (p.width, p.height) == (32, 32) for p, _ in got)
    assert all(at <= returned for _, at in got)
    assert [i.seed for i in streamed.images] == [i.seed for i in plain.images] == [21, 22]
    assert [i.b64 for i in streamed.images] == [i.b64 for i in plain.images]  # same batch shape: the same bytes


def test_the_command_serves_the_tiny_pipeline(tmp_path: Path) -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the child binds it; a race with another binder is unlikely on 127.0.0.1
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "local_backend", "serve", "--tiny", "--device", "cpu", "--port", str(port),
               "--buckets", "64x64", "--log-level", "warning"]  # fmt: skip
    log = (tmp_path / "service.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=90, process=process)
        response = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=30)
        assert response.status_code == 200 and len(response.json()["images"]) == 1
        assert httpx.get(f"{url}/v1/info").json()["buckets"] == ["64x64"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def test_the_openai_sdk_streams_real_previews_through_the_gateway_from_the_tiny_service(service_url: str, tmp_path: Path) -> None:
    """The whole path: the official SDK, the gateway pinned to the local backend, the tiny
    pipeline's denoising loop. Previews arrive before the image and are not the image."""
    import base64
    import io

    import openai
    from PIL import Image

    from tests.gateway_support import ENV, ServerThread, make_app

    app = make_app({**ENV, "KLEIN_LOCAL_URL": service_url})
    with ServerThread(app) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        events = list(
            client.images.generate(model="local/flux-2-klein-4b", prompt="a red fox", size="256x256", stream=True, partial_images=2, extra_body={"num_inference_steps": 4})
        )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"], kinds
    *previews, done = events
    final = Image.open(io.BytesIO(base64.b64decode(done.b64_json)))
    assert final.size == (256, 256)
    for preview in previews:
        shown = Image.open(io.BytesIO(base64.b64decode(preview.b64_json)))
        assert shown.size == (128, 128)  # half the side: a pooled decode of the latents
        assert shown.resize(final.size).tobytes() != final.convert(shown.mode).tobytes()
    assert done.model_extra is not None and done.model_extra["klein"]["backend"] == "local"
