"""End to end over real sockets: the official openai SDK -> the gateway (uvicorn
on 127.0.0.1) -> every provider's emulator (uvicorn on 127.0.0.1). No mocks.

The emulator fleet starts once for the module, in its own thread and event
loop; each test gets a fresh gateway (so breaker state never leaks from one
test into the next) and emulators reset to fast and healthy. Faults are set
through each emulator's admin API (`POST /_admin/knobs`), and what reached an
emulator is read back from `GET /_admin/stats` and its job book.

Prices (pricing/, docs/design.md#worked-examples) order 1024x1024 text-to-image as
local < replicate < fal < empiriolabs < runflow; Replicate cannot make
1024x768 exactly (its 1 MP 4:3 is 1183x887, docs/providers/replicate.md#sizes).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.emulators.launcher import EmulatorFleet
from tests.gateway_support import ServerThread, image_size_of, make_app, png_bytes

BACKENDS = ("local", "replicate", "fal", "empiriolabs", "runflow")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorFleet]:
    running = EmulatorFleet.start_in_thread()
    try:
        yield running
    finally:
        running.stop_thread()


@pytest.fixture(scope="module")
def admin(fleet: EmulatorFleet) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


class Rig:
    """One gateway in front of the fleet, and the admin calls a test makes."""

    def __init__(self, fleet: EmulatorFleet, admin: httpx.Client, server: ServerThread, sdk: openai.OpenAI) -> None:
        self.fleet = fleet
        self.admin = admin
        self.server = server
        self.sdk = sdk

    def knobs(self, name: str, patch: dict[str, Any]) -> None:
        response = self.admin.post(f"{self.fleet.emulators[name].base_url}/_admin/knobs", json=patch)
        assert response.status_code == 200, response.text

    def fail(self, *names: str, kind: str = "server_error") -> None:
        for name in names:
            self.knobs(name, {"faults": {kind: 1.0}})

    def stats(self, name: str) -> dict[str, Any]:
        response = self.admin.get(f"{self.fleet.emulators[name].base_url}/_admin/stats")
        assert response.status_code == 200
        return response.json()

    def generations(self) -> dict[str, int]:
        return {name: self.stats(name)["generations"] for name in BACKENDS}


@pytest.fixture
def rig(fleet: EmulatorFleet, admin: httpx.Client) -> Iterator[Rig]:
    for running in fleet.emulators.values():
        assert admin.post(f"{running.base_url}/_admin/reset").status_code == 200
    app = make_app(env=fleet.env())
    with ServerThread(app) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)
        try:
            yield Rig(fleet, admin, server, sdk)
        finally:
            sdk.close()
    for running in fleet.emulators.values():
        admin.post(f"{running.base_url}/_admin/reset")


def generate(rig: Rig, size: str, **kw: Any) -> tuple[Any, httpx.Headers]:
    raw = rig.sdk.images.with_raw_response.generate(model="flux-2-klein-4b", prompt="a lighthouse at dusk", size=size, **kw)
    return raw.parse(), raw.headers


def fetch(item: Any) -> bytes:
    """The image bytes of one result, b64 decoded or downloaded over HTTP."""
    if item.b64_json:
        return base64.b64decode(item.b64_json)
    assert item.url.startswith("http://127.0.0.1:"), item.url  # the gateway's or an emulator's loopback URL
    response = httpx.get(item.url, timeout=10)
    assert response.status_code == 200
    return response.content


def image_format(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a full decode, not only the header
        return str(im.format)


# ---- routing follows price -------------------------------------------------------

ROUTES = [
    # (size, backends failing, where it lands)
    ("1024x1024", (), "local"),
    ("1024x1024", ("local",), "replicate"),
    ("1024x1024", ("local", "replicate"), "fal"),
    ("1024x768", (), "local"),
    ("1024x768", ("local",), "fal"),  # replicate cannot make 1024x768: skipped, not tried
    ("1024x768", ("local", "fal"), "empiriolabs"),
]


@pytest.mark.parametrize("size,failing,expected", ROUTES, ids=[f"{s}-{'+'.join(f) or 'healthy'}-{e}" for s, f, e in ROUTES])
def test_request_lands_on_the_cheapest_healthy_eligible_backend(rig: Rig, size: str, failing: tuple[str, ...], expected: str) -> None:
    rig.fail(*failing)
    result, headers = generate(rig, size, response_format="b64_json")
    assert headers["x-klein-backend"] == expected
    assert headers["x-klein-attempts"] == str(len(failing) + 1)
    assert float(headers["x-klein-cost-usd"]) > 0
    w, h = (int(v) for v in size.split("x"))
    assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (w, h)
    made = rig.generations()
    assert made == {name: (1 if name == expected else 0) for name in BACKENDS}
    for name in failing:
        assert rig.stats(name)["faults"] == {"server_error": 1}
    if size == "1024x768":
        assert rig.stats("replicate")["paid_calls"] == 0


FAULTS = ["server_error", "rate_limited", "out_of_credit", "reset", "malformed"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_backend_fails_over_to_the_next_cheapest(rig: Rig, fault: str) -> None:
    rig.fail("local", kind=fault)
    result, headers = generate(rig, "1024x1024", response_format="b64_json")
    assert headers["x-klein-backend"] == "replicate"
    assert headers["x-klein-attempts"] == "2"
    assert rig.stats("local")["faults"] == {fault: 1}
    assert rig.stats("replicate")["generations"] == 1
    assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (1024, 1024)


def test_every_backend_down_gives_the_openai_502_envelope(rig: Rig) -> None:
    rig.fail(*BACKENDS)
    with pytest.raises(openai.InternalServerError) as caught:
        rig.sdk.images.generate(model="flux-2-klein-4b", prompt="a lighthouse", size="1024x1024")
    err = caught.value
    assert err.status_code == 502
    assert err.code == "all_backends_failed"
    assert err.type == "server_error"
    assert err.response.headers["x-klein-attempts"] == str(len(BACKENDS))
    assert err.response.headers["x-klein-cost-usd"] == "0"
    for name in BACKENDS:
        assert rig.stats(name)["faults"] == {"server_error": 1}
    body = err.response.text
    for running in rig.fleet.emulators.values():  # neither keys nor internal URLs leak
        assert str(running.port) not in body
        assert not running.key or running.key not in body


# ---- edits carry every reference ---------------------------------------------------


def job_specs(rig: Rig, name: str) -> list[Any]:
    """What each job an async emulator accepted asked for, read from its job
    book in this process (the stats count jobs, not their references)."""
    return [job.spec for job in rig.fleet.emulators[name].app.jobs._jobs.values()]


@pytest.mark.parametrize("backend", ["replicate", "fal", "runflow"])
def test_edit_with_three_images_reaches_the_backend_with_three_references(rig: Rig, backend: str) -> None:
    files = [(f"ref{i}.png", png_bytes(256 + 64 * i, 256), "image/png") for i in range(3)]
    raw = rig.sdk.images.with_raw_response.edit(model=f"{backend}/flux-2-klein-4b", image=files, prompt="make it night", size="1024x1024", response_format="b64_json")
    result = raw.parse()
    assert raw.headers["x-klein-backend"] == backend
    assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (1024, 1024)
    specs = job_specs(rig, backend)
    assert len(specs) == 1
    assert specs[0].edit_refs == 3


def test_edit_routes_by_edit_price_and_fails_over_with_its_references(rig: Rig) -> None:
    """Unpinned, an edit goes to local (cheapest); with local failing, to the
    next cheapest edit price, still with all three references."""
    rig.fail("local")
    files = [(f"ref{i}.png", png_bytes(320, 240), "image/png") for i in range(3)]
    raw = rig.sdk.images.with_raw_response.edit(model="flux-2-klein-4b", image=files, prompt="make it night", size="1024x1024", response_format="b64_json")
    assert raw.headers["x-klein-backend"] == "replicate"
    assert raw.headers["x-klein-attempts"] == "2"
    assert rig.stats("local")["faults"] == {"server_error": 1}
    assert [s.edit_refs for s in job_specs(rig, "replicate")] == [3]


# ---- what comes back decodes at the requested size and format -----------------------

OUTPUTS = [
    # (backend pinned, response_format, output_format, size, n)
    ("local", "b64_json", "png", "1024x1024", 1),
    ("local", "url", "png", "768x1024", 2),
    ("local", "url", "jpeg", "512x512", 1),
    ("replicate", "url", "png", "1024x1024", 1),  # the provider's own URL, passed through
    ("replicate", "b64_json", "webp", "1024x1024", 1),
    ("fal", "url", "jpeg", "1024x768", 2),
    ("fal", "b64_json", "png", "512x512", 1),
    ("empiriolabs", "b64_json", "jpeg", "1024x576", 1),
    ("runflow", "url", "webp", "1024x1024", 1),
]


@pytest.mark.parametrize("backend,response_format,fmt,size,n", OUTPUTS, ids=[f"{b}-{r}-{f}-{s}-n{n}" for b, r, f, s, n in OUTPUTS])
def test_images_decode_at_the_requested_size_and_format(rig: Rig, backend: str, response_format: str, fmt: str, size: str, n: int) -> None:
    raw = rig.sdk.images.with_raw_response.generate(model=f"{backend}/flux-2-klein-4b", prompt="a lighthouse", size=size, n=n, response_format=response_format, extra_body={"output_format": fmt})
    result = raw.parse()
    assert raw.headers["x-klein-backend"] == backend
    assert len(result.data) == n
    w, h = (int(v) for v in size.split("x"))
    for item in result.data:
        assert (item.url is None) == (response_format == "b64_json")
        data = fetch(item)
        assert image_size_of(data) == (w, h)
        assert image_format(data) == PIL_FORMATS[fmt]
