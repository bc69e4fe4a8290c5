"""Cheaper routes for the same work, end to end over real sockets: the openai
SDK -> the gateway (uvicorn on 127.0.0.1) -> every provider's emulator.

- A request for a shape (`aspect_ratio`) may be served at a backend's native
  size: 16:9 reaches Replicate at 1365x768 and costs Replicate's rule for
  that size. An exact `size` is never served at another size.
- An uploaded reference reaches EmpirioLabs (which takes URLs only) through a
  short-lived signed URL, when the gateway has a public base URL; the
  emulated EmpirioLabs downloads it from that URL.

The local GPU is the cheapest backend of all, so these requests ignore it
(`provider.ignore`) to show the choice among hosted backends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest

from tests.emulators.launcher import EmulatorFleet
from tests.gateway_support import ServerThread, free_port, image_size_of, make_app, png_bytes

HOSTED = ("replicate", "fal", "empiriolabs", "runflow")
NO_LOCAL = {"provider": {"ignore": ["local"]}}
NO_LOCAL_FORM = {"provider": json.dumps(NO_LOCAL["provider"])}  # multipart fields carry `provider` as JSON text


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
    def __init__(self, fleet: EmulatorFleet, admin: httpx.Client, server: ServerThread) -> None:
        self.fleet, self.admin, self.server = fleet, admin, server
        self.sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=20)

    def stats(self, name: str) -> dict[str, Any]:
        response = self.admin.get(f"{self.fleet.emulators[name].base_url}/_admin/stats")
        assert response.status_code == 200
        return response.json()

    def fail(self, *names: str) -> None:
        for name in names:
            response = self.admin.post(f"{self.fleet.emulators[name].base_url}/_admin/knobs", json={"faults": {"server_error": 1.0}})
            assert response.status_code == 200

    def replicate_inputs(self) -> list[dict[str, Any]]:
        return [job.input for job in self.fleet.emulators["replicate"].app.jobs._jobs.values()]


def _rig(fleet: EmulatorFleet, admin: httpx.Client, public: bool) -> Iterator[Rig]:
    for running in fleet.emulators.values():
        assert admin.post(f"{running.base_url}/_admin/reset").status_code == 200
    port = free_port()
    env = fleet.env() | ({"KLEIN_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}"} if public else {})
    with ServerThread(make_app(env=env), port=port) as server:
        rig = Rig(fleet, admin, server)
        try:
            yield rig
        finally:
            rig.sdk.close()


@pytest.fixture
def rig(fleet: EmulatorFleet, admin: httpx.Client) -> Iterator[Rig]:
    """A gateway with a public base URL (its own loopback address)."""
    yield from _rig(fleet, admin, public=True)


@pytest.fixture
def private_rig(fleet: EmulatorFleet, admin: httpx.Client) -> Iterator[Rig]:
    """A gateway with no public base URL configured."""
    yield from _rig(fleet, admin, public=False)


# ---- native sizes for a requested shape ------------------------------------------------


def test_a_16_9_aspect_ratio_is_served_by_replicate_at_its_native_size_and_priced_by_its_rule(rig: Rig) -> None:
    raw = rig.sdk.images.with_raw_response.generate(model="flux-2-klein-4b", prompt="a harbour at dawn", response_format="b64_json", extra_body={"aspect_ratio": "16:9", **NO_LOCAL})
    result = raw.parse()
    assert raw.headers["x-klein-backend"] == "replicate"
    # Replicate: $0.001 per output MP, exact (pricing/replicate.yaml); 1365x768 = 1.04832 MP.
    assert Decimal(raw.headers["x-klein-cost-usd"]) == Decimal("0.001") * Decimal(1365 * 768) / Decimal(1_000_000)
    assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (1365, 768)
    body = raw.http_response.json()
    assert body["size"] == "1365x768" and [d["size"] for d in body["data"]] == ["1365x768"]
    assert [(i["aspect_ratio"], i["output_megapixels"]) for i in rig.replicate_inputs()] == [("16:9", "1")]
    assert rig.stats("fal")["paid_calls"] == 0
    # the ledger agrees with the header: money and megapixels at the size produced
    metrics = httpx.get(f"{rig.server.url}/metrics", timeout=10).text
    assert metric(metrics, "klein_cost_usd_total", "replicate") == Decimal(raw.headers["x-klein-cost-usd"])
    assert metric(metrics, "klein_megapixels_total", "replicate") == Decimal("1.04832")


def metric(text: str, name: str, backend: str) -> Decimal:
    """The sum of one metric's samples for a backend, from the Prometheus text format."""
    total = Decimal(0)
    for line in text.splitlines():
        if line.startswith(name + "{") and f'backend="{backend}"' in line:
            total += Decimal(line.rsplit(" ", 1)[1])
    return total


def test_the_quote_prices_each_backend_at_the_size_it_would_produce(rig: Rig) -> None:
    response = httpx.post(f"{rig.server.url}/v1/images/quote", json={"prompt": "p", "aspect_ratio": "16:9", **NO_LOCAL}, timeout=10)
    assert response.status_code == 200, response.text
    table = response.json()
    rows = {row["name"]: row for row in table["backends"]}
    assert table["chosen"] == "replicate" and table["size"] == "1360x768" and table["chosen_size"] == "1365x768"
    assert rows["replicate"]["size"] == "1365x768" and rows["replicate"]["cost_usd"] == "0.00104832"
    assert rows["fal"]["size"] == "1360x768" and rows["fal"]["cost_usd"] == "0.0052224"


@pytest.mark.parametrize("failing", [(), ("fal",), ("fal", "empiriolabs", "runflow")], ids=["healthy", "fal-down", "all-but-replicate-down"])
def test_an_exact_1344x768_is_never_served_at_another_size(rig: Rig, failing: tuple[str, ...]) -> None:
    rig.fail(*failing)
    if len(failing) == 3:  # only Replicate is left, and it cannot make 1344x768
        with pytest.raises(openai.InternalServerError) as caught:
            rig.sdk.images.generate(model="flux-2-klein-4b", prompt="p", size="1344x768", extra_body=NO_LOCAL)
        assert caught.value.status_code == 502
    else:
        raw = rig.sdk.images.with_raw_response.generate(model="flux-2-klein-4b", prompt="p", size="1344x768", response_format="b64_json", extra_body=NO_LOCAL)
        result = raw.parse()
        assert raw.headers["x-klein-backend"] == ("empiriolabs" if failing else "fal")
        assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (1344, 768)
        assert raw.http_response.json()["size"] == "1344x768"
    assert rig.stats("replicate")["paid_calls"] == 0


# ---- uploads made reachable for URL-only backends ---------------------------------------


def _edit(rig: Rig, upload: bytes, **extra: Any) -> Any:
    return rig.sdk.images.with_raw_response.edit(
        model="flux-2-klein-4b", image=("ref.png", upload, "image/png"), prompt="make it night", size="1024x768", response_format="b64_json", extra_body=NO_LOCAL_FORM | extra
    )


def test_an_upload_edit_reaches_empiriolabs_through_a_short_lived_signed_url(rig: Rig) -> None:
    upload = png_bytes(1024, 768)
    before = time.time()
    raw = _edit(rig, upload)
    result = raw.parse()
    assert raw.headers["x-klein-backend"] == "empiriolabs"
    assert raw.headers["x-klein-cost-usd"] == "0.0085"  # flat per image (pricing/empiriolabs.yaml)
    assert image_size_of(base64.b64decode(result.data[0].b64_json)) == (1024, 768)
    fetched = rig.stats("empiriolabs")["references_fetched"]
    assert len(fetched) == 1
    got = fetched[0]
    assert got["status"] == 200 and got["size"] == "1024x768" and got["sha256"] == hashlib.sha256(upload).hexdigest()
    url = urlsplit(got["url"])
    assert got["url"].startswith(rig.server.url + "/v1/images/files/")
    expires = int(parse_qs(url.query)["expires"][0])
    assert before < expires <= time.time() + 300  # minutes, not the hour output URLs live
    assert url.geturl() not in raw.http_response.text  # the lent URL is never handed to the caller
    tampered = got["url"].replace("sig=", "sig=0")
    assert httpx.get(tampered, timeout=5).status_code == 404
    for name in ("fal", "replicate", "runflow"):
        assert rig.stats(name)["paid_calls"] == 0


def test_a_two_upload_edit_costs_empiriolabs_flat_price_not_fals_per_mp(rig: Rig) -> None:
    raw = rig.sdk.images.with_raw_response.edit(
        model="flux-2-klein-4b", image=[("a.png", png_bytes(1024, 1024), "image/png"), ("b.png", png_bytes(512, 512), "image/png")],
        prompt="merge", size="1152x896", n=2, response_format="b64_json", extra_body=NO_LOCAL_FORM,
    )  # fmt: skip
    assert raw.headers["x-klein-backend"] == "empiriolabs"
    assert raw.headers["x-klein-cost-usd"] == "0.017"  # 2 images x $0.0085
    assert len(rig.stats("empiriolabs")["references_fetched"]) == 2


def test_without_a_public_base_url_uploads_skip_empiriolabs_and_the_quote_says_why(private_rig: Rig) -> None:
    raw = _edit(private_rig, png_bytes(1024, 768))
    assert raw.headers["x-klein-backend"] == "fal"
    assert private_rig.stats("empiriolabs")["paid_calls"] == 0
    response = httpx.post(f"{private_rig.server.url}/v1/images/quote", json={"prompt": "p", "size": "1024x768", "edit_images": 1, **NO_LOCAL}, timeout=10)
    rows = {row["name"]: row for row in response.json()["backends"]}
    assert rows["empiriolabs"]["eligible"] is False
    assert "public_base_url" in rows["empiriolabs"]["reason"]


def test_with_a_public_base_url_the_quote_makes_empiriolabs_the_choice_for_an_upload_edit(rig: Rig) -> None:
    response = httpx.post(f"{rig.server.url}/v1/images/quote", json={"prompt": "p", "size": "1024x768", "edit_images": 1, **NO_LOCAL}, timeout=10)
    table = response.json()
    rows = {row["name"]: row for row in table["backends"]}
    assert rows["empiriolabs"]["eligible"] is True
    assert table["chosen"] == "empiriolabs" and table["cost_usd"] == "0.0085"


def test_a_lent_url_another_replica_cannot_serve_fails_over_to_a_backend_that_takes_the_bytes(fleet: EmulatorFleet, admin: httpx.Client) -> None:
    """Behind a load balancer the provider may fetch the lent URL from another
    replica, whose in-memory store lacks the upload: EmpirioLabs gets a 404, refuses
    the request, and the edit fails over to fal with the bytes; nothing is billed twice."""
    for running in fleet.emulators.values():
        assert admin.post(f"{running.base_url}/_admin/reset").status_code == 200
    shared_key = {"KLEIN_URL_SIGNING_KEY": "replicas-share-this-signing-key"}
    other_port = free_port()
    with ServerThread(make_app(env=fleet.env() | shared_key), port=other_port):
        env = fleet.env() | shared_key | {"KLEIN_PUBLIC_BASE_URL": f"http://127.0.0.1:{other_port}"}
        with ServerThread(make_app(env=env)) as server:
            rig = Rig(fleet, admin, server)
            try:
                raw = _edit(rig, png_bytes(1024, 768))
            finally:
                rig.sdk.close()
    assert raw.headers["x-klein-backend"] == "fal" and raw.headers["x-klein-attempts"] == "2"
    assert raw.headers["x-klein-cost-usd"] == "0.01786432"  # fal only: (0.786432 + 1) MP x $0.010
    assert image_size_of(base64.b64decode(raw.parse().data[0].b64_json)) == (1024, 768)
    fetched = rig.stats("empiriolabs")["references_fetched"]
    assert [f["status"] for f in fetched] == [404]
    assert rig.stats("empiriolabs")["images"] == 0
