"""Acme Images: one synchronous call per request (the example provider of docs/adding-a-provider.md).

Protocol: `POST {base}/v2/render` with `Authorization: Bearer <ACME_API_KEY>`
and `{"prompt", "width", "height", "count", "steps", "format", "quality",
"seed"}` answers `{"images": [{"b64", "width", "height"}], "seed"}`;
`GET {base}/v2/ping` is free and checks the key. There is no job id, so
nothing to follow or cancel.

Options (providers.yaml `options:`):
- `quality`: `final` (default) or `draft`.
- `probe_timeout_s`: seconds a probe may take; default 5.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import httpx

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import MEDIA_TYPES, ImageJob
from gateway.providers._wire import clip, http_error, maybe_json, redact
from gateway.providers.base import (
    Adapter,
    EmulatorHook,
    FailureClass,
    GeneratedImage,
    ProbeResult,
    ProviderError,
    ProviderResult,
    json_body,
)
from gateway.providers.options import AdapterOptions


@dataclass(frozen=True, slots=True)
class AcmeOptions(AdapterOptions):
    """The adapter's options, validated by name and type; see the module docstring."""

    quality: Literal["final", "draft"] = "final"
    probe_timeout_s: float = 5.0

    def validate(self, prefix: str) -> None:
        if self.probe_timeout_s <= 0:
            raise ValueError(f"{prefix}option probe_timeout_s must be positive")


class AcmeAdapter(Adapter):
    kind: ClassVar[str] = "acme"
    credential_env: ClassVar[str | None] = "ACME_API_KEY"
    base_url_env: ClassVar[str] = "KLEIN_ACME_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://api.acme.example"
    options_type = AcmeOptions
    default_capabilities: ClassVar[Capabilities] = Capabilities(max_side=1536, max_n=2, max_steps=8, edit=False, max_references=0)
    emulator: ClassVar[EmulatorHook | None] = EmulatorHook("tests.plugins.acme_emulator:AcmeEmulator", key_prefix="acme_emu_")
    opts: AcmeOptions

    async def generate(self, job: ImageJob, deadline: float) -> ProviderResult:
        body = {
            "prompt": job.prompt,
            "width": job.width,
            "height": job.height,
            "count": job.n,
            "steps": job.steps,
            "format": job.output_format,
            "quality": self.opts.quality,
        }
        if job.seed is not None:
            body["seed"] = job.seed
        response = await self.request("POST", f"{self.base}/v2/render", deadline=deadline, headers=self._auth(), json=body)
        if response.status_code >= 400:
            raise http_error(response, self._message(response))
        payload = json_body(response)
        items = payload.get("images") if isinstance(payload, dict) else None
        seed = payload.get("seed") if isinstance(payload, dict) and isinstance(payload.get("seed"), int) else job.seed
        images = [
            GeneratedImage(b64=item["b64"], content_type=MEDIA_TYPES[job.output_format], width=item.get("width"), height=item.get("height"), seed=seed)
            for item in items or []
            if isinstance(item, dict) and isinstance(item.get("b64"), str)
        ]
        if not images:  # nothing came back, so nothing is billed
            raise ProviderError(FailureClass.FAILED, f"HTTP {response.status_code}: the response holds no image", status=response.status_code)
        return ProviderResult(images=images, seed=seed)

    async def probe(self) -> ProbeResult:
        """`GET /v2/ping`: free, sent with the key so a revoked key shows up."""
        started = time.monotonic()
        try:
            response = await self.request("GET", f"{self.base}/v2/ping", deadline=started + self.opts.probe_timeout_s, headers=self._auth())
        except ProviderError as exc:
            return ProbeResult(False, exc.message, time.monotonic() - started)
        latency = time.monotonic() - started
        if response.status_code in (401, 403):
            return ProbeResult(False, f"credentials rejected (HTTP {response.status_code})", latency, credentials_invalid=True)
        return ProbeResult(response.is_success, f"HTTP {response.status_code}", latency)

    def _auth(self) -> dict[str, str]:
        if not self.settings.credential:
            raise ProviderError(FailureClass.REFUSED, "no Acme API key configured", credentials_invalid=True)
        return {"Authorization": f"Bearer {self.settings.credential}"}

    def _message(self, response: httpx.Response) -> str:
        body = maybe_json(response)
        text = body.get("message") if isinstance(body, dict) else None
        return redact(clip(str(text or "error")), self.settings.credential)
