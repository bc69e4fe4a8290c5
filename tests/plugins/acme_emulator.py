"""Acme Images on loopback: the emulator the Acme adapter's hook names."""

from __future__ import annotations

from typing import Any

from tests.emulators.asgi import Request, Response, Route, route
from tests.emulators.core import EmulatorApp
from tests.emulators.jobs import Spec


class AcmeEmulator(EmulatorApp):
    provider = "acme"
    sync = True

    def build_routes(self) -> list[Route]:
        return [route("POST", "/v2/render", "render", self.render, paid=True), route("GET", "/v2/ping", "ping", self.ping)]

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response.json(status, {"error": code, "message": message}, headers)

    async def render(self, request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return self.error(400, "bad_request", "a JSON body with a prompt is required")
        if body.get("format") not in ("png", "jpeg", "webp") or body.get("quality") not in ("final", "draft"):
            return self.error(422, "bad_request", "format or quality is not one Acme knows")
        spec = Spec(prompt=body["prompt"], width=int(body["width"]), height=int(body["height"]), fmt=body["format"], n=int(body.get("count", 1)), seed=int(body.get("seed", self.new_seed())))
        images = await self.render_all(spec)
        self.count_generation(len(images))
        return Response.json(200, {"images": [{"b64": im.b64(), "width": spec.width, "height": spec.height} for im in images], "seed": spec.seed})

    async def ping(self, request: Request) -> Response:
        return Response.json(200, {"ok": True})
