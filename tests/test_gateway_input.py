"""Bad input of every kind gets a 4xx OpenAI envelope, and no backend is called.

Also: the quote endpoint's worked examples, models and aliases, and bearer keys.
"""

from __future__ import annotations

import base64
import logging

import httpx
import pytest
from litestar.testing import AsyncTestClient

from tests.gateway_support import ENV, PROVIDERS_YAML, FakeAdapter, ServerThread, install_fakes, make_app, png_bytes

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
    ("stream_with_url_answer", ok(stream=True, response_format="url"), 400, "response_format"),
    ("partial_images_too_many", ok(stream=True, partial_images=4), 400, "partial_images"),
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
    resp = await client.post("/v1/images/edits", content=b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--xyz', headers={"content-type": "multipart/form-data; boundary=abc"})
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


# ---- errors litestar raises itself: counted, logged, stamped ------------------------

BROKEN_MULTIPART = b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--xyz'
LITESTAR_ERRORS = [
    ("broken_multipart", "POST", "/v1/images/edits", {"content": BROKEN_MULTIPART, "headers": {"content-type": "multipart/form-data; boundary=abc"}}, "edits", 400),
    ("body_over_limit", "POST", "/v1/images/generations", {"content": b"x" * (64 * 1024 * 1024 + 1), "headers": {"content-type": "application/json"}}, "generations", 413),
    ("wrong_method", "GET", "/v1/images/generations", {}, "unmatched", 405),
    ("unknown_route", "GET", "/v1/nothing-here", {}, "unmatched", 404),
    ("bad_query_parameter", "GET", "/v1/images/files/x.png?expires=soon&sig=0", {}, "image_file", 400),
]


@pytest.mark.parametrize("label,method,path,kwargs,route,status", LITESTAR_ERRORS, ids=[c[0] for c in LITESTAR_ERRORS])
async def test_litestar_client_errors_are_counted_and_logged_by_their_real_status(client, caplog, label, method, path, kwargs, route, status):
    registry = client.app.state.gateway.metrics.registry
    caplog.set_level(logging.INFO, logger="klein.request")
    resp = await client.request(method, path, **kwargs)
    assert resp.status_code == status
    assert resp.headers["x-request-id"]
    assert registry.get_sample_value("klein_requests_total", {"route": route, "status_class": "4xx", "backend": "none"}) == 1
    assert registry.get_sample_value("klein_requests_total", {"route": route, "status_class": "5xx", "backend": "none"}) is None
    lines = [r for r in caplog.records if r.name == "klein.request"]
    assert [(r.route, r.status, r.request_id) for r in lines] == [(route, status, resp.headers["x-request-id"])]


async def test_405_names_the_allowed_methods_and_they_are_allowed(client):
    resp = await client.delete("/v1/images/generations")
    assert resp.status_code == 405
    allowed = {m.strip() for m in resp.headers["allow"].split(",")}
    assert allowed == {"POST", "OPTIONS"}
    assert "allowed: POST" in resp.json()["error"]["message"]
    assert (await client.options("/v1/images/generations")).status_code < 400


EVERY_KIND_OF_ANSWER = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/backends"),
    ("GET", "/v1/models/dall-e-3"),
    ("GET", "/v1/images/files/x.png?expires=1&sig=0"),
    ("GET", "/nowhere"),
    ("PUT", "/v1/models"),
]


@pytest.mark.parametrize("method,path", EVERY_KIND_OF_ANSWER, ids=[f"{m} {p}" for m, p in EVERY_KIND_OF_ANSWER])
async def test_every_answer_carries_the_callers_request_id_or_a_new_one(client, method, path):
    given = await client.request(method, path, headers={"x-request-id": "trace-42.a"})
    assert given.headers["x-request-id"] == "trace-42.a"
    fresh = await client.request(method, path, headers={"x-request-id": "bad id with spaces"})
    assert fresh.headers["x-request-id"].startswith("req_")


# ---- pinning a disabled backend: one answer however it is pinned --------------------


async def test_pinning_a_disabled_backend_by_model_or_by_provider_only_gets_the_same_400():
    app = make_app({k: v for k, v in ENV.items() if k != "EMPIRIOLABS_API_KEY"})
    install_fakes(app, {n: FakeAdapter(n) for n in NAMES if n != "empiriolabs"})
    async with AsyncTestClient(app) as c:
        by_model = await c.post("/v1/images/generations", json={"prompt": "x", "model": "empiriolabs/flux-2-klein-4b"})
        by_only = await c.post("/v1/images/generations", json={"prompt": "x", "provider": {"only": ["empiriolabs"]}})
        mixed = await c.post("/v1/images/generations", json={"prompt": "x", "response_format": "b64_json", "provider": {"only": ["empiriolabs", "fal"]}})
    for resp in (by_model, by_only):
        assert resp.status_code == 400
        assert resp.headers["x-should-retry"] == "false"
        err = resp.json()["error"]
        assert err["code"] == "backend_disabled"
        assert err["message"] == "backend empiriolabs is not enabled on this gateway; enabled backends: fal, local, replicate, runflow"
        assert "EMPIRIOLABS_API_KEY" not in resp.text  # the operator's reason stays in /v1/backends and the start-up log
    assert by_model.json()["error"]["param"] == "model" and by_only.json()["error"]["param"] == "provider"
    assert mixed.status_code == 200 and mixed.headers["x-klein-backend"] == "fal"


# ---- signed image URLs point where the operator says, never at the caller's Host ---


def _served_url(env: dict[str, str], host_header: str) -> tuple[str, str]:
    app = make_app(env)
    install_fakes(app, {n: FakeAdapter(n) for n in NAMES})
    with ServerThread(app) as server:
        resp = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "size": "512x512"}, headers={"host": host_header}, timeout=20)
        assert resp.status_code == 200, resp.text
        url = resp.json()["data"][0]["url"]
        fetched = httpx.get(server.url + url[url.index("/v1/images/files/") :], timeout=20)
        assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
        return url, server.url


def test_signed_image_urls_use_the_bound_address_not_the_host_header():
    url, server_url = _served_url(dict(ENV), "evil.example")
    assert url.startswith(server_url + "/v1/images/files/")
    assert "evil.example" not in url


@pytest.mark.parametrize("via", ["env", "providers.yaml"])
def test_signed_image_urls_use_the_configured_public_base_url(tmp_path, via):
    env, config = dict(ENV), PROVIDERS_YAML
    if via == "env":
        env["KLEIN_PUBLIC_BASE_URL"] = "https://images.example.com/"
    else:
        config = tmp_path / "providers.yaml"
        config.write_text(PROVIDERS_YAML.read_text().replace("gateway:\n", "gateway:\n  public_base_url: https://images.example.com\n", 1))
        (tmp_path / "pricing").symlink_to(PROVIDERS_YAML.parent / "pricing")
    app = make_app(env, config=config)
    install_fakes(app, {n: FakeAdapter(n) for n in NAMES})
    with ServerThread(app) as server:
        resp = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "size": "512x512"}, headers={"host": "evil.example"}, timeout=20)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"][0]["url"].startswith("https://images.example.com/v1/images/files/")


# ---- reference pixels are decoded on arrival, off the event loop -----------------------


@pytest.mark.parametrize("form", ["multipart", "json_data_uri"])
async def test_reference_pixels_are_decoded_in_a_worker_thread_not_on_the_event_loop(client, monkeypatch, form):
    import asyncio

    import gateway.http.openai as api
    from gateway.dispatch.references import check_decodes

    seen: list[tuple[str, bool]] = []

    def recording(data: bytes, param: str) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((param, on_loop))
        check_decodes(data, param)

    monkeypatch.setattr(api, "check_decodes", recording)
    if form == "multipart":
        resp = await client.post("/v1/images/edits", files=[("image[]", ("a.png", PNG, "image/png")), ("image[]", ("b.png", PNG, "image/png"))], data={"prompt": "x", "response_format": "b64_json"})
        expected = [("image", False), ("image", False)]
    else:
        uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
        resp = await client.post("/v1/images/generations", json={"prompt": "x", "images": [uri, uri], "response_format": "b64_json"})
        expected = [("images[0]", False), ("images[1]", False)]
    assert resp.status_code == 200, resp.text
    assert sorted(seen) == expected


async def test_an_oversized_upload_is_refused_one_byte_past_the_cap_without_reading_the_rest():
    from litestar.datastructures import UploadFile

    from gateway.dispatch.references import MAX_REFERENCE_BYTES
    from gateway.domain.errors import PayloadTooLarge
    from gateway.http.openai import read_upload

    upload = UploadFile(content_type="image/png", filename="big.png", file_data=PNG + b"\x00" * (MAX_REFERENCE_BYTES + 4 * 1024 * 1024))
    with pytest.raises(PayloadTooLarge) as refused:
        await read_upload(upload, "image")
    assert refused.value.param == "image" and f"{MAX_REFERENCE_BYTES:,}" in refused.value.message
    assert upload.file.tell() == MAX_REFERENCE_BYTES + 1  # stopped there: the rest was never read
    exact = UploadFile(content_type="image/png", filename="ok.png", file_data=b"\x01" * MAX_REFERENCE_BYTES)
    assert len(await read_upload(exact, "image")) == MAX_REFERENCE_BYTES


async def test_a_bug_answers_500_with_the_request_id_and_is_counted_as_5xx(client, caplog, monkeypatch):
    gw = client.app.state.gateway

    async def broken(job):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gw, "quote_table", broken)
    caplog.set_level(logging.INFO)
    resp = await client.post("/v1/images/quote", json={"prompt": "x"}, headers={"x-request-id": "bug-7"})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"] == "bug-7"
    assert resp.json()["error"]["code"] == "internal_error" and "a bug" not in resp.text
    assert gw.metrics.registry.get_sample_value("klein_requests_total", {"route": "quote", "status_class": "5xx", "backend": "none"}) == 1
    assert any(r.name == "klein.request" and r.request_id == "bug-7" and r.status == 500 for r in caplog.records)
