"""Bad input of every kind gets a 4xx OpenAI envelope, and no backend is called.

Also: the quote endpoint's worked examples, models and aliases, and bearer keys.
"""

from __future__ import annotations

import base64

import pytest
from litestar.testing import AsyncTestClient

from tests.gateway_support import ENV, FakeAdapter, install_fakes, make_app, png_bytes

PNG = png_bytes(256, 256)
NAMES = ["local", "replicate", "fal", "empiriolabs", "runflow"]


@pytest.fixture
async def client():
    app = make_app()
    fakes = {n: FakeAdapter(n) for n in NAMES}
    install_fakes(app, fakes)
    async with AsyncTestClient(app) as c:
        c.fakes = fakes  # type: ignore[attr-defined]  # the tests reach the fakes through their client
        yield c


def ok(**extra):
    return {"prompt": "a cat", **extra}


JSON_CASES = [
    ("missing_prompt", {"size": "512x512"}, 400, "prompt"),
    ("empty_prompt", {"prompt": "   "}, 400, "prompt"),
    ("prompt_wrong_type", {"prompt": 42}, 400, "prompt"),
    ("prompt_too_long", ok(prompt="x" * 4001), 400, "prompt"),
    ("n_zero", ok(n=0), 400, "n"),
    ("n_five", ok(n=5), 400, "n"),
    ("n_string", ok(n="two"), 400, "n"),
    ("n_fraction", ok(n=1.5), 400, "n"),
    ("size_garbage", ok(size="big"), 400, "size"),
    ("size_off_grid", ok(size="1000x1000"), 400, "size"),
    ("size_too_small", ok(size="32x32"), 400, "size"),
    ("size_side_too_big", ok(size="4096x256"), 400, "size"),
    ("size_over_4mp", ok(size="2048x2064"), 400, "size"),
    ("size_and_aspect", ok(size="512x512", aspect_ratio="1:1"), 400, "aspect_ratio"),
    ("aspect_garbage", ok(aspect_ratio="wide"), 400, "aspect_ratio"),
    ("aspect_extreme", ok(aspect_ratio="20:1"), 400, "aspect_ratio"),
    ("image_size_unknown_preset", ok(image_size="huge"), 400, "image_size"),
    ("steps_zero", ok(num_inference_steps=0), 400, "num_inference_steps"),
    ("steps_too_many", ok(num_inference_steps=51), 400, "num_inference_steps"),
    ("seed_negative", ok(seed=-1), 400, "seed"),
    ("guidance_out_of_range", ok(guidance_scale=99), 400, "guidance_scale"),
    ("response_format_unknown", ok(response_format="html"), 400, "response_format"),
    ("output_format_unknown", ok(output_format="gif"), 400, "output_format"),
    ("compression_out_of_range", ok(output_compression=101), 400, "output_compression"),
    ("transparent_background", ok(background="transparent"), 400, "background"),
    ("stream_requested", ok(stream=True), 400, "stream"),
    ("unknown_model", ok(model="dall-e-3"), 404, "model"),
    ("unknown_backend_pin", ok(model="nowhere/flux-2-klein-4b"), 404, "model"),
    ("provider_unknown_backend", ok(provider={"only": ["nowhere"]}), 400, "provider"),
    ("provider_negative_price", ok(provider={"max_price": -1}), 400, "provider.max_price"),
    ("too_many_images", ok(images=["https://example.com/a.png"] * 5), 400, "image"),
    ("image_not_a_url", ok(images=["ftp://example.com/a.png"]), 400, "images[0]"),
    ("image_loopback_url", ok(images=["http://127.0.0.1/a.png"]), 400, "images[0]"),
    ("image_private_url", ok(images=["http://10.0.0.5/a.png"]), 400, "images[0]"),
    ("image_data_uri_not_image", ok(images=["data:image/png;base64," + base64.b64encode(b"hello world, not a png").decode()]), 415, "images[0]"),
    ("image_data_uri_bad_base64", ok(images=["data:image/png;base64,@@@"]), 400, "images[0]"),
]


@pytest.mark.parametrize("label,body,status,param", JSON_CASES, ids=[c[0] for c in JSON_CASES])
async def test_bad_json_generation_gets_4xx_envelope_naming_the_field(client, label, body, status, param):
    resp = await client.post("/v1/images/generations", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["param"] == param
    assert resp.headers["x-should-retry"] == "false"
    assert not any(f.calls for f in client.fakes.values())


RAW_CASES = [
    ("not_json", b"{not json", "application/json", 400),
    ("json_array", b"[1, 2]", "application/json", 400),
    ("wrong_content_type", b"prompt=cat", "text/plain", 415),
]


@pytest.mark.parametrize("label,raw,ctype,status", RAW_CASES, ids=[c[0] for c in RAW_CASES])
async def test_unparseable_bodies_get_4xx_envelope(client, label, raw, ctype, status):
    resp = await client.post("/v1/images/generations", content=raw, headers={"content-type": ctype})
    assert resp.status_code == status
    assert "error" in resp.json()


async def test_huge_body_gets_413_envelope(client):
    resp = await client.post("/v1/images/generations", content=b'{"prompt": "' + b"x" * (65 * 1024 * 1024) + b'"}', headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000x30000 pixels: must be refused before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


MULTIPART_CASES = [
    ("no_image", {}, {"prompt": "x"}, 400),
    ("text_file_as_image", {"image": ("a.png", b"not an image at all", "image/png")}, {"prompt": "x"}, 415),
    ("gif_upload", {"image": ("a.gif", b"GIF89a" + b"\x00" * 40, "image/gif")}, {"prompt": "x"}, 415),
    ("decompression_bomb", {"image": ("a.png", bomb_png(), "image/png")}, {"prompt": "x"}, 413),
    ("tiny_image", {"image": ("a.png", png_bytes(16, 16), "image/png")}, {"prompt": "x"}, 400),
    ("mask_given", {"image": ("a.png", PNG, "image/png"), "mask": ("m.png", PNG, "image/png")}, {"prompt": "x"}, 400),
    ("missing_prompt", {"image": ("a.png", PNG, "image/png")}, {}, 400),
    ("n_not_a_number", {"image": ("a.png", PNG, "image/png")}, {"prompt": "x", "n": "lots"}, 400),
]


@pytest.mark.parametrize("label,files,data,status", MULTIPART_CASES, ids=[c[0] for c in MULTIPART_CASES])
async def test_bad_multipart_edit_gets_4xx_envelope(client, label, files, data, status):
    resp = await client.post("/v1/images/edits", files=files or None, data=data)
    assert resp.status_code == status, resp.text
    assert "error" in resp.json()
    assert not any(f.calls for f in client.fakes.values())


async def test_too_many_uploaded_images_is_refused(client):
    files = [("image[]", (f"{i}.png", PNG, "image/png")) for i in range(5)]
    resp = await client.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "image"


async def test_broken_multipart_body_is_refused(client):
    resp = await client.post("/v1/images/edits", content=b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--xyz", headers={"content-type": "multipart/form-data; boundary=abc"})
    assert 400 <= resp.status_code < 500
    assert "error" in resp.json()


@pytest.mark.parametrize("field", ["image", "image[]", "image[0]"])
async def test_edit_accepts_every_image_field_spelling(client, field):
    resp = await client.post("/v1/images/edits", files=[(field, ("a.png", PNG, "image/png"))], data={"prompt": "make it blue", "size": "512x512", "response_format": "b64_json"})
    assert resp.status_code == 200, resp.text
    job = client.fakes["local"].calls[-1]
    assert len(job.references) == 1 and job.references[0].width == 256


async def test_unknown_route_gets_404_envelope(client):
    resp = await client.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


QUOTE_T2I = {"fal": "0.00524288", "replicate": "0.00104858", "runflow": "0.01404858", "empiriolabs": "0.0085"}
QUOTE_EDIT2 = {"fal": "0.03048576", "replicate": "0.00304858", "runflow": "0.005", "empiriolabs": "0.0085"}


@pytest.mark.parametrize("edit_images,expected", [(0, QUOTE_T2I), (2, QUOTE_EDIT2)], ids=["text_to_image", "edit_two_refs"])
async def test_quote_returns_the_worked_examples_exactly(client, edit_images, expected):
    body = {"prompt": "x", "size": "1024x1024"}
    if edit_images:
        body["edit_images"] = edit_images
    resp = await client.post("/v1/images/quote", json=body)
    assert resp.status_code == 200, resp.text
    rows = {r["name"]: r for r in resp.json()["backends"]}
    for name, usd in expected.items():
        assert rows[name]["cost_usd"] == usd, name
    assert rows["local"]["cost_usd"].startswith("0.000415")
    assert resp.json()["chosen"] == "local"
    assert not any(f.calls for f in client.fakes.values())


async def test_models_list_and_aliases(client):
    listed = (await client.get("/v1/models")).json()
    ids = [m["id"] for m in listed["data"]]
    assert listed["object"] == "list" and "flux-2-klein-4b" in ids and "fal/flux-2-klein-4b" in ids
    for alias in ["flux-2-klein-4b", "flux.2-klein-4b", "black-forest-labs/flux-2-klein-4b", "fal/flux-2-klein-4b"]:
        resp = await client.get(f"/v1/models/{alias}")
        assert resp.status_code == 200, alias
    missing = await client.get("/v1/models/dall-e-3")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_backends_without_credentials_are_disabled_and_listed():
    env = {k: v for k, v in ENV.items() if k != "RUNFLOW_API_KEY"}
    app = make_app(env)
    async with AsyncTestClient(app) as c:
        rows = {r["name"]: r for r in (await c.get("/v1/backends")).json()["data"]}
    assert rows["runflow"]["enabled"] is False and "RUNFLOW_API_KEY" in rows["runflow"]["reason"]
    assert rows["fal"]["enabled"] is True and rows["fal"]["price_basis"] == "per_megapixel"


@pytest.mark.parametrize("header,status", [(None, 401), ("Bearer wrong", 401), ("Basic abc", 401), ("Bearer k-good", 200)])
async def test_bearer_keys_are_enforced_when_configured(header, status):
    app = make_app({**ENV, "KLEIN_GATEWAY_KEYS": "k-other, k-good"})
    install_fakes(app, {n: FakeAdapter(n) for n in NAMES})
    async with AsyncTestClient(app) as c:
        headers = {"authorization": header} if header else {}
        resp = await c.post("/v1/images/generations", json={"prompt": "x", "size": "512x512", "response_format": "b64_json"}, headers=headers)
    assert resp.status_code == status
    if status == 401:
        assert resp.json()["error"]["type"] == "authentication_error"
        assert "k-good" not in resp.text


async def test_quote_judges_edits_by_the_edit_endpoints_limits(client):
    """Runflow's edit endpoint makes 1024x1024 only; its text-to-image endpoint any size."""
    edit = (await client.post("/v1/images/quote", json={"prompt": "x", "size": "512x512", "edit_images": 1})).json()
    t2i = (await client.post("/v1/images/quote", json={"prompt": "x", "size": "512x512"})).json()
    assert {r["name"]: r["eligible"] for r in edit["backends"]}["runflow"] is False
    assert {r["name"]: r["eligible"] for r in t2i["backends"]}["runflow"] is True
