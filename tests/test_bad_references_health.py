"""Bad reference images are the caller's fault and never the backend's.

A truncated PNG used to pass the gateway's header checks, fail to decode on the
local GPU service, come back as a 500 and count against the local backend:
three such uploads opened its breaker, and the next good request paid about
120 times more elsewhere. Here the real local service (a fake generator, no
GPU) runs on a loopback port behind the real gateway and local adapter.
"""

from __future__ import annotations

import io
import random

import httpx
import pytest
from PIL import Image

import gateway.http.openai
from local_backend.app import create_app as create_local_app
from tests.gateway_support import ENV, FakeAdapter, ServerThread, install_fakes, make_app, wait_until
from tests.local_backend.conftest import FakeGenerator, make_settings

HOSTED = ["replicate", "fal", "empiriolabs", "runflow"]
BAD_UPLOADS = 8  # well past any breaker's failure threshold


def _noise_png(side: int = 128) -> bytes:
    rng = random.Random(3)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3))).save(out, "PNG")
    return out.getvalue()


GOOD = _noise_png()
TRUNCATED = GOOD[: len(GOOD) // 2]


@pytest.fixture
def stack():
    """The local service on a loopback port, and the gateway in front of it (hosted backends faked)."""
    fake_gpu = FakeGenerator()
    local_app = create_local_app(make_settings(), fake_gpu)
    with ServerThread(local_app) as local:
        assert wait_until(lambda: httpx.get(local.url + "/health/ready").status_code == 200, timeout=20)
        app = make_app({**ENV, "KLEIN_LOCAL_URL": local.url})
        hosted = {n: FakeAdapter(n) for n in HOSTED}
        install_fakes(app, hosted)
        with ServerThread(app) as gw:
            yield gw, local_app.state.service.metrics.registry, hosted, fake_gpu


def _edit(gw: ServerThread, data: bytes) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/images/edits",
        files={"image": ("ref.png", data, "image/png")},
        data={"prompt": "make it blue", "size": "128x128", "response_format": "b64_json"},
        timeout=30,
    )


def _local_state(gw: ServerThread) -> dict:
    rows = {r["name"]: r for r in httpx.get(gw.url + "/v1/backends", timeout=10).json()["data"]}
    return rows["local"]


def _generated(fake_gpu: FakeGenerator) -> int:
    return len([c for c in fake_gpu.calls if c.prompts != ["warm-up"]])


def test_bad_uploads_are_refused_at_the_door_and_the_cheapest_backend_keeps_serving(stack):
    gw, _, hosted, fake_gpu = stack
    for _ in range(BAD_UPLOADS):
        resp = _edit(gw, TRUNCATED)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "invalid_image"
    assert _generated(fake_gpu) == 0 and not any(f.calls for f in hosted.values())
    good = _edit(gw, GOOD)
    assert good.status_code == 200, good.text
    assert good.headers["x-klein-backend"] == "local"
    assert _local_state(gw)["state"] == "closed"


def test_a_backend_blaming_the_input_is_not_counted_against_its_health(stack, monkeypatch):
    """The hard case: broken references that get past the gateway's own check
    (simulated by switching that check off) reach the local service, which
    answers 422 invalid_reference_image; its breaker must stay closed."""
    gw, local_registry, _, fake_gpu = stack
    monkeypatch.setattr(gateway.http.openai, "check_decodes", lambda data, param: None)
    for _ in range(BAD_UPLOADS):
        _edit(gw, TRUNCATED)  # whatever a hosted backend makes of it; the local one refuses it
    state = _local_state(gw)
    assert state["state"] == "closed" and state["available"] is True, state
    assert _generated(fake_gpu) == 0
    refused = local_registry.get_sample_value("local_backend_rejected_total", {"reason": "invalid"}) or 0
    assert refused >= 3, "the broken references must reach the local service (and be refused there) for this case to mean anything"
    monkeypatch.undo()
    good = _edit(gw, GOOD)
    assert good.status_code == 200, good.text
    assert good.headers["x-klein-backend"] == "local"
    assert _generated(fake_gpu) == 1
