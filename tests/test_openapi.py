"""The OpenAPI document says what the gateway really does.

It is valid OpenAPI 3.1; it lists every route and method the app serves and no
other; every status that a hostile-input row gets is declared for that
operation (or, for a wrong method or an unknown path, the document agrees
that there is no such operation); and live answers match their schemas.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import jsonschema
import pytest
from litestar.testing import AsyncTestClient
from openapi_spec_validator import validate

from gateway.http.openapi import document
from tests.gateway_support import FakeAdapter, install_fakes, make_app, png_bytes
from tests.test_hostile_inputs import ROWS, Row

METHODS = {"get", "post", "put", "patch", "delete", "head"}
DOC = document()


def _template(litestar_path: str) -> str:
    """`/v1/models/{model_id:path}` -> `/v1/models/{model_id}`."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", litestar_path)


def _operation_for(path: str) -> str | None:
    """The document's path template that a concrete request path falls under."""
    path = urlsplit(path).path
    for template in DOC["paths"]:
        pattern = "^" + re.sub(r"\{model_id\}", ".+", re.sub(r"\{(?!model_id)\w+\}", "[^/]+", template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def test_the_document_is_valid_openapi_3_1():
    validate(DOC)
    assert DOC["openapi"] == "3.1.0"


def test_every_route_the_app_serves_is_documented_and_nothing_else():
    app = make_app()
    served = {(_template(r.path), m.lower()) for r in app.routes for m in r.methods if m != "OPTIONS"}
    documented = {(path, method) for path, item in DOC["paths"].items() for method in item if method in METHODS}
    assert served == documented


def test_every_operation_declares_x_request_id_on_every_answer():
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                assert "x-request-id" in response.get("headers", {}), f"{method.upper()} {path} {status}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_every_hostile_status_is_declared_for_its_operation(row: Row):
    template = _operation_for(row.path)
    method = row.method.lower()
    if row.status == 404 and row.code == "not_found":
        assert template is None, "an unknown route must not be in the document"
        return
    assert template is not None, row.path
    if row.status == 405:
        assert method not in DOC["paths"][template], "a 405 method must not be documented"
        return
    responses = DOC["paths"][template][method]["responses"]
    assert str(row.status) in responses, f"{row.method} {template} answers {row.status}, undeclared"


async def test_the_served_document_is_the_module_document():
    async with AsyncTestClient(make_app()) as client:
        resp = await client.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == DOC


def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": DOC["components"]}
    return jsonschema.Draft202012Validator(schema)


LIVE = [
    ("POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "512x512", "response_format": "b64_json"}}, 200, "ImagesResponse"),
    ("POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "512x512"}}, 200, "ImagesResponse"),
    ("POST", "/v1/images/edits", {"files": {"image": ("a.png", png_bytes(256, 256), "image/png")}, "data": {"prompt": "x"}}, 200, "ImagesResponse"),
    ("POST", "/v1/images/quote", {"json": {"prompt": "x", "edit_images": 2}}, 200, "Quote"),
    ("GET", "/v1/models", {}, 200, "ModelList"),
    ("GET", "/v1/models/fal/flux-2-klein-4b", {}, 200, "Model"),
    ("GET", "/v1/backends", {}, 200, "BackendList"),
    ("GET", "/healthz", {}, 200, "Health"),
    ("GET", "/readyz", {}, 200, "Readiness"),
    ("POST", "/v1/images/generations", {"json": {"prompt": "x", "n": 9}}, 400, "Error"),
    ("GET", "/v1/models/dall-e-3", {}, 404, "Error"),
]


@pytest.mark.parametrize("method,path,kwargs,status,schema", LIVE, ids=[f"{m} {p} {s}" for m, p, _, s, _ in LIVE])
async def test_live_answers_match_their_documented_schema(method, path, kwargs, status, schema):
    app = make_app()
    install_fakes(app, {n: FakeAdapter(n) for n in ["local", "replicate", "fal", "empiriolabs", "runflow"]})
    async with AsyncTestClient(app) as client:
        resp = await client.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    template = _operation_for(path)
    declared = DOC["paths"][template][method.lower()]["responses"][str(status)]
    assert "application/json" in declared["content"]
    _validator(schema).validate(resp.json())
    for name, header in declared["headers"].items():
        ref = header["$ref"].rsplit("/", 1)[1]
        if DOC["components"]["headers"][ref].get("required"):
            assert name in resp.headers, name
