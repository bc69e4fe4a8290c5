"""providers.yaml: which backends exist and how to reach them, validated.

The file names each backend's kind, base URL, credential variable, timeouts,
price sheet, capability overrides, adapter options and breaker thresholds.
Twelve-factor: credentials and base URLs come from the environment under the
names each adapter declares (`credential_env`, `base_url_env`; the file may
rename the variables). A backend without its credential (or, for a service
addressed by URL alone, its address) is disabled and says why; a bad file
names the file, the field and the problem. Which kinds exist, and their
defaults, come from the provider registry (`gateway.providers`).

Which file: `--config` or `KLEIN_CONFIG` if given, else `./providers.yaml`,
else the defaults shipped inside the package (see `find_config`), so every
command works from any directory after a plain install.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.domain.errors import ConfigError
from gateway.health.probes import ProbeSettings
from gateway.health.tracker import BreakerPolicy
from gateway.providers import adapter_class, capabilities_for
from gateway.routing.pricing import PriceSheet, PriceSheetError, load_sheet
from gateway.settings import Settings

CONFIG_NAME = "providers.yaml"
CONFIG_ENV = "KLEIN_CONFIG"
IMAGE_KEEP_SLACK_S = 60  # how long an image outlives the record that refers to it (GatewaySettings.images_kept_s)
_ELSEWHERE = f"Point at another with --config PATH or {CONFIG_ENV}=PATH, or write an editable copy of the defaults with `klein-gateway init [DIR]`."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TimeoutsConfig(_Strict):
    connect: float = Field(default=5.0, gt=0)
    request: float = Field(default=60.0, gt=0)
    poll_interval: float = Field(default=0.25, gt=0)
    max_poll_interval: float = Field(default=2.0, gt=0)


class BackendConfig(_Strict):
    kind: str  # a registered provider kind (gateway.providers)
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
    expected_latency_s: float | None = Field(default=None, gt=0)  # before any is measured: tie-break, and a deadline shorter than it skips the backend

    @field_validator("kind")
    @classmethod
    def _registered(cls, value: str) -> str:
        try:
            adapter_class(value)
        except LookupError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        return value


class S3Settings(_Strict):
    bucket: str | None = None  # KLEIN_S3_BUCKET
    prefix: str = "klein/images/"  # KLEIN_S3_PREFIX
    endpoint_url: str | None = None  # KLEIN_S3_ENDPOINT: R2, MinIO, GCS interoperability; unset for AWS
    region: str | None = None  # KLEIN_S3_REGION, else AWS_REGION


class ImageStoreSettings(_Strict):
    """Where images the gateway serves itself live (gateway.images)."""

    # auto: memory with one worker, filesystem with several. KLEIN_IMAGE_STORE overrides.
    kind: Literal["auto", "memory", "filesystem", "s3"] = "auto"
    path: str | None = None  # the filesystem store's directory; KLEIN_IMAGE_DIR overrides
    url_mode: Literal["gateway", "presigned"] = "gateway"  # presigned: the caller fetches from the bucket (s3 only)
    rehost: bool = False  # copy provider-hosted images into the store (their URLs expire) and answer with ours
    sweep_every_s: float = Field(default=30.0, gt=0)  # how often expired and over-cap images are deleted
    s3: S3Settings = Field(default_factory=S3Settings)

    @model_validator(mode="after")
    def _presigned_needs_s3(self) -> ImageStoreSettings:
        if self.url_mode == "presigned" and self.kind not in ("s3", "auto"):
            raise ValueError(f"url_mode presigned needs kind s3, not {self.kind}")
        return self


class GatewaySettings(_Strict):
    default_deadline_s: float = Field(default=120.0, gt=0, le=3600)
    max_deadline_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_prompt_chars: int = Field(default=4000, gt=0)
    image_url_ttl_s: int = Field(default=3600, gt=0)
    image_store_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    public_base_url: str | None = None  # where signed image URLs point; default: the request's own host
    # Uploaded references lent to URL-only backends expire this soon (and never after image_url_ttl_s).
    reference_url_ttl_s: int = Field(default=300, gt=0, le=3600)
    # A request for a shape (aspect_ratio, preset, auto) may be served at a backend's
    # native size this close to the resolved one (relative; gateway/domain/native_sizes.py).
    native_size_ratio_tolerance: float = Field(default=0.01, ge=0, le=0.1)
    native_size_pixel_tolerance: float = Field(default=0.10, ge=0, le=0.5)
    baseline_backend: str | None = "fal"  # savings are measured against this backend's price
    log_prompts: bool = False
    # Requests one worker process holds at once; beyond it the caller gets 503
    # with Retry-After at once, before the event loop saturates and slow timers
    # start to look like sick backends. Sized for 5,000 in flight against slow
    # upstreams within 500 MB (bench/overhead.py).
    max_in_flight: int = Field(default=6000, gt=0)
    image_store: ImageStoreSettings = Field(default_factory=ImageStoreSettings)
    # On SIGTERM: how long requests in flight may take to finish before they are
    # cancelled (and their provider jobs with them). Keep the orchestrator's
    # grace (terminationGracePeriodSeconds) above it.
    shutdown_grace_s: float = Field(default=25.0, gt=0, le=3600)
    # The usage ledger's SQLite file (relative: beside providers.yaml; KLEIN_USAGE_LEDGER
    # overrides); DATABASE_URL, when set, puts it in PostgreSQL instead. None: in memory.
    usage_ledger: str | None = None
    # Async jobs (Prefer: respond-async), webhooks and idempotency keys.
    async_deadline_s: float = Field(default=600.0, gt=0, le=86400)  # an async job's deadline when the caller sets none
    job_retention_s: float = Field(default=86400.0, gt=0)  # how long a job (and an idempotent answer) is kept
    job_concurrency: int = Field(default=16, gt=0, le=1024)  # jobs one replica runs at once
    job_visibility_timeout_s: float = Field(default=30.0, ge=1)  # a silent worker's job is taken over after this
    webhook_allow: list[str] = Field(default_factory=list)  # hosts and CIDRs webhooks may reach besides public https
    webhook_retry_delays_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0], max_length=20)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    idempotency_ttl_s: float = Field(default=86400.0, gt=0)
    # Uploaded files (/v1/files): the largest one accepted (413 above it), and how long
    # one is kept when the upload sets no expires_after (OpenAI keeps batch files 30 days).
    max_file_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    file_retention_s: int = Field(default=30 * 86400, ge=3600)
    # Batches (/v1/batches): how many of one batch's lines may run at once on the
    # local GPU (keep it near the local backend's batch size) and on hosted backends.
    batch_local_slots: int = Field(default=4, gt=0, le=256)
    batch_hosted_slots: int = Field(default=16, gt=0, le=1024)

    def images_kept_s(self, record_ttl_s: float) -> int:
        """How long an image the gateway stores must live when a record kept
        `record_ttl_s` refers to it (a job's result, an idempotent answer): never
        less than `image_url_ttl_s`, and a minute past the record, which covers
        the store's whole-second expiry and the moment between storing the image
        and writing the record. So a URL in a readable record always serves."""
        return max(self.image_url_ttl_s, math.ceil(record_ttl_s) + IMAGE_KEEP_SLACK_S)

    # How often each process re-reads every backend's health from the state store
    # (one batched read); breaker transitions also arrive over pub/sub at once. At
    # most 1000, so a breaker opened on one replica is honoured by the others
    # within a second even when a pub/sub message is lost.
    health_refresh_ms: int = Field(default=250, ge=10, le=1000)
    # What carries provider calls and the Range reads of their images: aiohttp's
    # pool and parser with no client layer (gateway/net/aiohttp_wire.py), or an
    # httpx client on httpx's own sharded httpcore pools (gateway/net/transport.py). KLEIN_UPSTREAM_CLIENT overrides.
    upstream_client: Literal["aiohttp", "httpx"] = "aiohttp"


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


def shipped_config() -> Path:
    """The providers.yaml that ships with the package, its pricing/ beside it.

    An installed wheel carries them as gateway/defaults/ (setup.py copies the
    repository's top-level files there at build time); a source checkout or
    an editable install reads the repository's own."""
    here = Path(__file__).resolve().parent
    packaged = here / "defaults" / CONFIG_NAME
    return packaged if packaged.is_file() else here.parent / CONFIG_NAME


def find_config(explicit: str | Path | None = None, env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> Path:
    """The providers.yaml to use: `explicit` (--config), else $KLEIN_CONFIG,
    else ./providers.yaml, else the shipped defaults.

    A file that was named but is missing is an error (never silently replaced
    by the defaults); the error names every path tried and how to point elsewhere."""
    env = os.environ if env is None else env
    for given, source in ((explicit, "--config"), (Settings.from_env(env).config, CONFIG_ENV)):
        if given:
            path = Path(given)
            if path.is_file():
                return path
            raise ConfigError(f"{path}: file not found (named by {source}). {_ELSEWHERE}")
    local = (Path(cwd) if cwd is not None else Path()) / CONFIG_NAME
    shipped = shipped_config()
    for path in (local, shipped):
        if path.is_file():
            return path
    raise ConfigError(f"no {CONFIG_NAME} found; tried {local.resolve()} (the current directory) and {shipped} (the defaults shipped with the package). {_ELSEWHERE}")


def read_providers_file(path: Path) -> ProvidersFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found. {_ELSEWHERE}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file. {_ELSEWHERE}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: (top level): expected a mapping with a 'backends' key")
    try:
        return ProvidersFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_text(path, exc)) from None


def load_config(path: str | Path | None = None, pricing_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate providers.yaml and every price sheet it names.

    Without a `path`, the file is found as `find_config` says."""
    env = os.environ if env is None else env
    path = Path(path) if path is not None else find_config(env=env)
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
        adapter = adapter_class(cfg.kind)
        try:
            adapter.options_type.parse(cfg.options, cfg.kind)
        except ValueError as exc:
            problems.append(f"{path}: backends.{name}.options: {exc}")
        else:
            problem = _capability_problem(cfg)
            if problem:
                problems.append(f"{path}: backends.{name}.capabilities: {problem}")
        base_env = cfg.base_url_env or adapter.base_url_env
        base_url = env.get(base_env) or cfg.base_url or adapter.default_base_url
        cred_env = cfg.credential_env or adapter.credential_env
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
    try:
        capabilities_for(cfg.kind, cfg.options, cfg.capabilities)
    except (TypeError, ValueError, KeyError) as exc:
        return str(exc).replace("__init__() ", "") or type(exc).__name__
    return None
