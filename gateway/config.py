"""providers.yaml: which backends exist and how to reach them, validated.

The file names each backend's kind, base URL, credential variable, timeouts,
price sheet, capability overrides, adapter options and breaker thresholds.
Twelve-factor: credentials and base URLs come from the environment under the
names ARCHITECTURE section 1 gives (the file may rename the variables). A
backend without its credential (or, for the local GPU, its address) is
disabled and says why; a bad file names the file, the field and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.health import BreakerPolicy
from gateway.probes import ProbeSettings
from gateway.pricing import PriceSheet, PriceSheetError, load_sheet

KINDS = ("fal", "replicate", "runflow", "empiriolabs", "local")

# Documented defaults per kind (shared/reference/providers.md section 0).
DEFAULT_BASE_URLS = {
    "fal": "https://queue.fal.run",
    "replicate": "https://api.replicate.com",
    "runflow": "https://api.runflow.io",
    "empiriolabs": "https://api.empiriolabs.ai",
    "local": None,
}
DEFAULT_BASE_URL_ENV = {
    "fal": "KLEIN_FAL_BASE_URL",
    "replicate": "KLEIN_REPLICATE_BASE_URL",
    "runflow": "KLEIN_RUNFLOW_BASE_URL",
    "empiriolabs": "KLEIN_EMPIRIOLABS_BASE_URL",
    "local": "KLEIN_LOCAL_URL",
}
DEFAULT_CREDENTIAL_ENV = {
    "fal": "FAL_KEY",
    "replicate": "REPLICATE_API_TOKEN",
    "runflow": "RUNFLOW_API_KEY",
    "empiriolabs": "EMPIRIOLABS_API_KEY",
    "local": None,
}


class ConfigError(ValueError):
    """A configuration problem, phrased as `file: field: problem`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TimeoutsConfig(_Strict):
    connect: float = Field(default=5.0, gt=0)
    request: float = Field(default=60.0, gt=0)
    poll_interval: float = Field(default=0.25, gt=0)
    max_poll_interval: float = Field(default=2.0, gt=0)


class BackendConfig(_Strict):
    kind: Literal["fal", "replicate", "runflow", "empiriolabs", "local"]
    enabled: bool = True
    base_url: str | None = None
    base_url_env: str | None = None
    credential_env: str | None = None
    price_sheet: str | None = None  # file name under the pricing directory
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)  # free health probes; never a paid generation
    expected_latency_s: float | None = Field(default=None, gt=0)  # tie-break before any is measured


class GatewaySettings(_Strict):
    default_deadline_s: float = Field(default=120.0, gt=0, le=3600)
    max_deadline_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_prompt_chars: int = Field(default=4000, gt=0)
    image_url_ttl_s: int = Field(default=3600, gt=0)
    image_store_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    public_base_url: str | None = None  # where signed image URLs point; default: the request's own host
    baseline_backend: str | None = "fal"  # savings are measured against this backend's price
    log_prompts: bool = False
    # Requests one worker process holds at once; beyond it the caller gets 503
    # with Retry-After at once, before the event loop saturates and slow timers
    # start to look like sick backends. Sized for 5,000 in flight against slow
    # upstreams within 500 MB (bench/overhead.py).
    max_in_flight: int = Field(default=6000, gt=0)
    # Async jobs (Prefer: respond-async), webhooks and idempotency keys.
    async_deadline_s: float = Field(default=600.0, gt=0, le=86400)  # an async job's deadline when the caller sets none
    job_retention_s: float = Field(default=86400.0, gt=0)  # how long a job (and an idempotent answer) is kept
    job_concurrency: int = Field(default=16, gt=0, le=1024)  # jobs one replica runs at once
    job_visibility_timeout_s: float = Field(default=30.0, ge=1)  # a silent worker's job is taken over after this
    webhook_allow: list[str] = Field(default_factory=list)  # hosts and CIDRs webhooks may reach besides public https
    webhook_retry_delays_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0], max_length=20)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    idempotency_ttl_s: float = Field(default=86400.0, gt=0)


class ProvidersFile(_Strict):
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    backends: dict[str, BackendConfig]

    @field_validator("backends")
    @classmethod
    def _names(cls, value: dict[str, BackendConfig]) -> dict[str, BackendConfig]:
        if not value:
            raise ValueError("at least one backend is required")
        for name in value:
            if not name.replace("-", "").replace("_", "").isalnum() or "/" in name:
                raise ValueError(f"backend name {name!r} must be letters, digits, '-' or '_'")
        return value


class ResolvedBackend(BaseModel):
    """One backend after the environment is applied: ready to build an adapter."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    config: BackendConfig
    base_url: str | None
    credential: str | None = Field(default=None, repr=False)
    sheet: PriceSheet
    disabled_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None


class GatewayConfig(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    settings: GatewaySettings
    backends: list[ResolvedBackend]
    path: Path
    pricing_dir: Path

    @property
    def enabled(self) -> list[ResolvedBackend]:
        return [b for b in self.backends if b.enabled]


def _error_text(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{path}: {loc}: {err['msg']}")
    return "\n".join(lines)


def read_providers_file(path: Path) -> ProvidersFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: (top level): expected a mapping with a 'backends' key")
    try:
        return ProvidersFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_text(path, exc)) from None


def load_config(path: str | Path = "providers.yaml", pricing_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate providers.yaml and every price sheet it names."""
    path = Path(path)
    env = os.environ if env is None else env
    pricing = Path(pricing_dir) if pricing_dir else path.parent / "pricing"
    parsed = read_providers_file(path)
    problems: list[str] = []
    resolved: list[ResolvedBackend] = []
    for name, cfg in parsed.backends.items():
        sheet_file = pricing / (cfg.price_sheet or f"{name}.yaml")
        try:
            sheet = load_sheet(sheet_file)
        except PriceSheetError as exc:
            problems.append(f"{path}: backends.{name}.price_sheet: {exc}")
            continue
        problem = _capability_problem(cfg)
        if problem:
            problems.append(f"{path}: backends.{name}.capabilities: {problem}")
        base_env = cfg.base_url_env or DEFAULT_BASE_URL_ENV[cfg.kind]
        base_url = env.get(base_env) or cfg.base_url or DEFAULT_BASE_URLS[cfg.kind]
        cred_env = cfg.credential_env or DEFAULT_CREDENTIAL_ENV[cfg.kind]
        credential = env.get(cred_env) if cred_env else None
        reason = None
        if not cfg.enabled:
            reason = "disabled in providers.yaml"
        elif not base_url:
            reason = f"no address: set {base_env}"
        elif cred_env and not credential:
            reason = f"no credential: set {cred_env}"
        resolved.append(ResolvedBackend(name=name, config=cfg, base_url=base_url.rstrip("/") if base_url else None, credential=credential, sheet=sheet, disabled_reason=reason))
    if problems:
        raise ConfigError("\n".join(problems))
    baseline = parsed.gateway.baseline_backend
    if baseline and baseline not in parsed.backends:
        raise ConfigError(f"{path}: gateway.baseline_backend: {baseline!r} is not a configured backend")
    return GatewayConfig(settings=parsed.gateway, backends=resolved, path=path, pricing_dir=pricing)


def _capability_problem(cfg: BackendConfig) -> str | None:
    """Capability overrides and adapter options must make a valid Capabilities."""
    from gateway.providers import capabilities_for  # adapters import config-free modules only

    try:
        capabilities_for(cfg.kind, cfg.options, cfg.capabilities)
    except (TypeError, ValueError, KeyError) as exc:
        return str(exc).replace("__init__() ", "") or type(exc).__name__
    return None
