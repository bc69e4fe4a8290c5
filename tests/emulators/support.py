"""Helpers shared by the emulator tests: calls per provider, admin access, decoding."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image


def auth(fleet, name: str, key: str | None = None) -> dict[str, str]:
    """The provider's own credential header."""
    emulator = fleet[name]
    key = emulator.key if key is None else key
    scheme = "Key" if name == "fal" else "Bearer"
    return {"Authorization": f"{scheme} {key}"} if key else {}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | None = None


# One paid call (creates a job or a generation) per provider.
PAID: dict[str, Call] = {
    "fal": Call("POST", "/fal-ai/flux-2/klein/4b", {"prompt": "a red fox", "image_size": "square"}),
    "replicate": Call("POST", "/v1/models/black-forest-labs/flux-2-klein-4b/predictions", {"input": {"prompt": "a red fox"}}),
    "runflow": Call("POST", "/v1/models/black-forest-labs/flux-2-klein-4b/runs", {"input": {"prompt": "a red fox"}}),
    "empiriolabs": Call("POST", "/v1/images/generations", {"model": "flux-2-klein-4b", "prompt": "a red fox", "size": "512x512"}),
    "local": Call("POST", "/v1/images/generations", {"prompt": "a red fox", "width": 256, "height": 256}),
}

# The free calls a health probe would make.
PROBES: dict[str, list[Call]] = {
    "fal": [Call("GET", "/fal-ai/flux-2/requests/00000000-0000-0000-0000-000000000000/status")],
    "replicate": [Call("GET", "/v1/models/black-forest-labs/flux-2-klein-4b"), Call("GET", "/v1/account")],
    "runflow": [Call("GET", "/v1/health"), Call("GET", "/v1/billing/balance")],
    "empiriolabs": [Call("GET", "/v1/models/flux-2-klein-4b"), Call("GET", "/v1/models")],
    "local": [Call("GET", "/v1/info"), Call("GET", "/health/live"), Call("GET", "/health/ready"), Call("GET", "/metrics")],
}

HOSTED = ["fal", "replicate", "runflow", "empiriolabs"]
ALL = [*HOSTED, "local"]


async def send(client: httpx.AsyncClient, fleet, name: str, call: Call, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", None)
    if headers is None:
        headers = auth(fleet, name)
    return await client.request(call.method, fleet[name].base_url + call.path, json=call.body, headers=headers, **kw)


async def knobs(client: httpx.AsyncClient, fleet, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(fleet[name].base_url + "/_admin/knobs", json=patch)
    assert response.status_code == 200, response.text
    return response.json()


async def stats(client: httpx.AsyncClient, fleet, name: str) -> dict[str, Any]:
    response = await client.get(fleet[name].base_url + "/_admin/stats")
    assert response.status_code == 200
    return response.json()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
