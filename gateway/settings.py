"""Every environment variable the gateway reads, in one place, documented from itself.

`Settings.from_env(env)` reads a mapping (os.environ by default) at the moment
it is called, so each read site builds one where it read the variable before:
nothing is cached at import, and a test that sets a variable sees it at once.
Each call looks every variable up again; only a set of values not seen before
is validated, so a read costs microseconds, not pydantic's fraction of a millisecond.
Values the gateway checks (a port, a store kind, a webhook secret) stay raw
strings here and are checked where they are used, so a bad value fails there,
with the same message, and never breaks a read of an unrelated variable.

Provider credentials and base URLs are not here: each adapter declares its own
(`credential_env`, `base_url_env`). `python -m gateway.settings` prints the
table committed as docs/settings.md. Imports nothing else of the gateway's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

TRUE_WORDS: Final = ("1", "true", "yes", "on")


def _var(name: str, description: str, default: Any = None, *, secret: bool = False) -> Any:
    """A field read from the variable `name`; a secret one is left out of repr."""
    return Field(default, validation_alias=name, description=description, repr=not secret, json_schema_extra={"secret": True} if secret else None)


class Settings(BaseSettings):
    """The gateway's environment. Build it with `from_env`, where the value is needed."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=True)

    # Files and processes
    config: str | None = _var("KLEIN_CONFIG", "providers.yaml to use when --config is not given; else ./providers.yaml, else the defaults shipped with the package.")
    pricing: str | None = _var("KLEIN_PRICING", "Price sheet directory; else pricing/ beside providers.yaml.")
    workers: str | None = _var("KLEIN_WORKERS", "Worker processes behind one port (a whole number); `serve --workers` sets it for its workers. Unset: 1.")
    log_level: str = _var("KLEIN_LOG_LEVEL", "Log level of the app (DEBUG, INFO, WARNING, ...); `serve --log-level` sets it.", "INFO")
    log_prompt_length: bool = _var("KLEIN_LOG_PROMPT_LENGTH", "1, true, yes or on: each request's log line carries the prompt's length (never its text).", False)
    upstream_client: str | None = _var("KLEIN_UPSTREAM_CLIENT", "Client for provider calls, aiohttp or httpx; else providers.yaml gateway.upstream_client.")
    public_base_url: str | None = _var("KLEIN_PUBLIC_BASE_URL", "The address callers reach the gateway at, for signed image URLs; overrides providers.yaml gateway.public_base_url.")

    # Callers
    gateway_keys: str | None = _var("KLEIN_GATEWAY_KEYS", "Comma-separated caller keys. Neither this nor KLEIN_KEYS_FILE: the gateway is open.", secret=True)
    keys_file: str | None = _var("KLEIN_KEYS_FILE", "Keys file (named keys with budgets and backend allowlists), reloaded when it changes.")

    # Metrics
    metrics_token: str | None = _var("KLEIN_METRICS_TOKEN", "Bearer token every /metrics scrape must send; unset, /metrics needs none.", secret=True)
    metrics_port: str | None = _var("KLEIN_METRICS_PORT", "Serve /metrics on this port (1-65535) only, not on the API port; `serve --metrics-port` sets it.")
    metrics_key_secret: str | None = _var("KLEIN_METRICS_KEY_SECRET", "HMAC key for callers' metric labels; unset, each process (or `serve`, for its workers) draws a random one.", secret=True)
    prometheus_multiproc_dir: str | None = _var("PROMETHEUS_MULTIPROC_DIR", "Directory where worker processes share metrics; `serve --workers N` makes one when unset.")
    prometheus_multiproc_dir_lowercase: str | None = _var("prometheus_multiproc_dir", "The same, by the lowercase name prometheus_client also accepts; PROMETHEUS_MULTIPROC_DIR wins.")

    # Shared state and money
    redis_url: str | None = _var("REDIS_URL", "Redis for state shared by replicas (health, limits, budgets, jobs); unset, each process keeps its own in memory.", secret=True)
    state_namespace: str = _var("KLEIN_STATE_NAMESPACE", "Prefix of the gateway's Redis keys (klein:<namespace>:...), so deployments can share one Redis.", "default")
    database_url: str | None = _var("DATABASE_URL", "PostgreSQL for the usage ledger; overrides KLEIN_USAGE_LEDGER.", secret=True)
    ledger_claim_idle_s: float = _var("KLEIN_LEDGER_CLAIM_IDLE_S", "With REDIS_URL: seconds a usage row given to a replica may wait unwritten before another replica takes it over.", 30.0)
    usage_ledger: str | None = _var("KLEIN_USAGE_LEDGER", "SQLite file of the usage ledger (:memory: for none kept); else providers.yaml gateway.usage_ledger.")

    # Async jobs
    webhook_allow: str | None = _var("KLEIN_WEBHOOK_ALLOW", "Comma-separated hosts or networks webhooks may be sent to, added to providers.yaml gateway.webhook_allow.")
    webhook_secret: str | None = _var("KLEIN_WEBHOOK_SECRET", "Key webhooks are signed with: whsec_ and base64 of at least 16 bytes; unset, webhooks are not signed.", secret=True)

    # Image store
    image_store: str | None = _var("KLEIN_IMAGE_STORE", "Where served images live: memory, filesystem, s3 or auto; else providers.yaml gateway.image_store.kind.")
    image_dir: str | None = _var("KLEIN_IMAGE_DIR", "Directory of the filesystem image store; else gateway.image_store.path (`serve --workers N` makes one when neither is set).")
    image_url_mode: str | None = _var("KLEIN_IMAGE_URL_MODE", "Image URLs signed by the gateway (gateway) or presigned by the s3 store (presigned); else gateway.image_store.url_mode.")
    url_signing_key: str | None = _var("KLEIN_URL_SIGNING_KEY", "Key that signs image URLs; set it on every replica sharing a store (required for s3 with url_mode gateway).", secret=True)
    s3_bucket: str | None = _var("KLEIN_S3_BUCKET", "Bucket of the s3 image store; else gateway.image_store.s3.bucket.")
    s3_endpoint: str | None = _var("KLEIN_S3_ENDPOINT", "Endpoint URL of an S3-compatible store (R2, MinIO, GCS); else gateway.image_store.s3.endpoint_url.")
    s3_region: str | None = _var("KLEIN_S3_REGION", "Region of the s3 image store; else gateway.image_store.s3.region, else AWS_REGION.")
    s3_prefix: str | None = _var("KLEIN_S3_PREFIX", "Key prefix of images in the bucket; else gateway.image_store.s3.prefix.")
    aws_access_key_id: str | None = _var("AWS_ACCESS_KEY_ID", "Access key of the s3 image store.", secret=True)
    aws_secret_access_key: str | None = _var("AWS_SECRET_ACCESS_KEY", "Secret key of the s3 image store.", secret=True)
    aws_session_token: str | None = _var("AWS_SESSION_TOKEN", "Session token of the s3 image store, with temporary credentials.", secret=True)
    aws_region: str | None = _var("AWS_REGION", "Region of the s3 image store when neither KLEIN_S3_REGION nor the config names one.")
    aws_default_region: str | None = _var("AWS_DEFAULT_REGION", "Region after AWS_REGION; none of them set: us-east-1.")

    @field_validator("log_prompt_length", mode="before")
    @classmethod
    def _opt_in(cls, value: Any) -> bool:
        """Only the words that mean yes turn it on; anything else is off, never an error."""
        return value if isinstance(value, bool) else str(value).strip().lower() in TRUE_WORDS

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what `from_env` passes in: a mapping given to it must not be topped up from os.environ."""
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings in `env` (os.environ when None), read now: each call looks every variable up
        again, and only a set of values not seen before is validated (a few microseconds otherwise)."""
        env = os.environ if env is None else env
        return _validated(tuple(env.get(name) for name in _VARIABLES))

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable a field is read from."""
        alias = cls.model_fields[field].validation_alias
        assert isinstance(alias, str)
        return alias


_VARIABLES: Final = tuple(Settings.variable(name) for name in Settings.model_fields)


@lru_cache(maxsize=64)
def _validated(values: tuple[str | None, ...]) -> Settings:
    """One frozen Settings per set of values: the same environment is validated once, not on every read."""
    return Settings.model_validate({name: value for name, value in zip(_VARIABLES, values, strict=True) if value is not None})


def variables() -> dict[str, str]:
    """Each declared environment variable, to the field that holds it."""
    return {Settings.variable(name): name for name in Settings.model_fields}


def _type_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not hasattr(annotation, "__args__") else None
    text = text or str(annotation).replace("typing.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")  # a bare | would split the Markdown table's cell


def markdown() -> str:
    """docs/settings.md: a heading, one line on where it comes from, and the table (variable, type, default, description)."""
    lines = [
        "# Environment variables",
        "",
        "Every variable the gateway reads, generated from `gateway/settings.py` by `python -m gateway.settings`; provider credentials and base URLs are listed on each provider's page.",
        "",
        "| Variable | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f"`{str(field.default).lower() if isinstance(field.default, bool) else field.default}`"
        lines.append(f"| `{Settings.variable(name)}` | `{_type_text(field.annotation)}` | {default} | {field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
