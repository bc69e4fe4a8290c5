"""Settings of the local backend (local_backend/README.md#settings).

One pydantic model, filled from `KLEIN_LOCAL_<FIELD>` environment variables
and then from command-line flags (flags win). Choices where the reference is
silent:

* `device="auto"` picks cuda when torch sees a GPU, else cpu; `dtype="auto"`
  is bfloat16 on cuda and float32 on cpu (fp16 is not recommended for the FLUX
  family, docs/local-backend.md#versions).
* `gpu_usd_per_hour=0` means "no price configured": cost figures are then
  None, and the gateway prices the backend from its own sheet.
* `max_steps` defaults to 50 (the model's and the gateway's limit); the
  distilled model is meant for 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from local_backend.buckets import (
    DEFAULT_BUCKETS,
    MODEL_MAX_PIXELS,
    MODEL_MAX_SIDE,
    MODEL_MIN_SIDE,
    SizeLimits,
    parse_sizes,
)

ENV_PREFIX = "KLEIN_LOCAL_"
SafetyOption = Literal["none", "opennsfw", "hf-classifier"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # what to load
    model_path: Path | None = None  # a local diffusers folder; never downloaded
    tiny: bool = False  # build the tiny random pipeline in code instead
    model_id: str = "black-forest-labs/FLUX.2-klein-4B"  # reported in /v1/info only
    device: str = "auto"
    dtype: Dtype = "auto"
    compile: bool = False  # transformer.compile_repeated_blocks(fullgraph=True)

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    max_body_bytes: int = 64 * 1024 * 1024  # four large base64 references fit

    # what requests may ask for
    min_side: int = MODEL_MIN_SIDE
    max_side: int = MODEL_MAX_SIDE
    max_pixels: int = MODEL_MAX_PIXELS
    max_steps: int = Field(default=50, ge=1, le=50)

    # batching and the queue
    buckets: tuple[tuple[int, int], ...] = DEFAULT_BUCKETS
    max_batch_images: int = Field(default=8, ge=1)
    max_batch_pixels: int = Field(default=4 * 1024 * 1024, ge=64 * 64)
    batch_delay_ms: float = Field(default=10.0, ge=0)
    max_queue: int = Field(default=32, ge=1)  # queued requests, not counting the running batch
    max_queue_megapixels: float | None = None  # optional bound on queued output megapixels
    request_timeout_s: float = Field(default=60.0, gt=0)  # deadline when a request sets none

    # warm-up: readiness waits for one generation per size listed here
    warmup: bool = True
    warmup_sizes: tuple[tuple[int, int], ...] | None = None  # None: the buckets
    warmup_steps: int = Field(default=4, ge=1)

    # safety post-filter (docs/local-backend.md#safety-post-filter)
    safety: SafetyOption = "none"
    safety_model_path: Path | None = None  # for hf-classifier
    safety_threshold: float | None = Field(default=None, ge=0, le=1)  # None: the checker's default

    # cost
    gpu_usd_per_hour: float = Field(default=0.0, ge=0)
    utilization_window_s: float = Field(default=900.0, gt=0)

    @field_validator("buckets", "warmup_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if value is None:
            return None
        return parse_sizes(value)

    @model_validator(mode="after")
    def _model_source(self) -> Settings:
        if self.tiny == (self.model_path is not None):
            raise ValueError("give exactly one of model_path (--model PATH) or tiny (--tiny)")
        if self.safety == "hf-classifier" and self.safety_model_path is None:
            raise ValueError("safety 'hf-classifier' needs safety_model_path (a local folder)")
        return self

    @property
    def limits(self) -> SizeLimits:
        return SizeLimits(min_side=self.min_side, max_side=self.max_side, max_pixels=self.max_pixels)

    @property
    def warmup_plan(self) -> tuple[tuple[int, int], ...]:
        return self.buckets if self.warmup_sizes is None else self.warmup_sizes

    @property
    def model_name(self) -> str:
        return "tiny-random-flux2-klein" if self.tiny else self.model_id


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`KLEIN_LOCAL_<FIELD>` variables for known fields, as raw strings."""
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for name in Settings.model_fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            found[name] = value
    return found


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, with flags (None values ignored) on top."""
    values: dict[str, Any] = env_overrides(environ)
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = value
    return Settings(**values)
