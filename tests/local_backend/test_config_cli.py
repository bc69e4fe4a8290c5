"""Settings: where they come from and what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from local_backend.buckets import DEFAULT_BUCKETS
from local_backend.cli import build_parser, settings_from_args
from local_backend.config import Settings, load_settings


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({}, "exactly one of model_path"),
        ({"tiny": True, "model_path": "/models/klein"}, "exactly one of model_path"),
        ({"tiny": True, "safety": "hf-classifier"}, "safety_model_path"),
        ({"tiny": True, "safety": "nudenet"}, "safety"),
        ({"tiny": True, "max_steps": 51}, "max_steps"),
    ],
)
def test_settings_refuse_bad_combinations(values: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(**values)


def test_defaults_are_local_only_and_fal_buckets() -> None:
    settings = Settings(tiny=True)
    assert settings.host == "127.0.0.1"
    assert settings.buckets == DEFAULT_BUCKETS
    assert settings.warmup_plan == DEFAULT_BUCKETS
    assert settings.safety == "none"
    assert settings.gpu_usd_per_hour == 0.0


def test_environment_then_flags() -> None:
    env = {"KLEIN_LOCAL_TINY": "true", "KLEIN_LOCAL_MAX_QUEUE": "7", "KLEIN_LOCAL_BUCKETS": "64x64,128x128",
           "KLEIN_LOCAL_URL": "http://ignored"}  # fmt: skip
    settings = load_settings({"max_queue": 9, "port": None}, env)
    assert settings.tiny and settings.max_queue == 9
    assert settings.buckets == ((64, 64), (128, 128))


def test_cli_flags_map_onto_settings() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "/models/klein", "--device", "cuda", "--max-batch-images", "4",
         "--max-batch-megapixels", "2", "--gpu-usd-per-hour", "2.5", "--no-warmup", "--warmup-sizes", "square",
         "--safety", "hf-classifier", "--safety-model", "/models/falconsai"]
    )  # fmt: skip
    settings = settings_from_args(args, environ={})
    assert settings.model_path == Path("/models/klein") and not settings.tiny
    assert settings.device == "cuda" and settings.max_batch_images == 4
    assert settings.max_batch_pixels == 2_000_000
    assert settings.gpu_usd_per_hour == 2.5 and settings.warmup is False
    assert settings.warmup_sizes == ((512, 512),)
    assert settings.safety_model_path == Path("/models/falconsai")


def test_cli_refuses_model_and_tiny_together() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "/m", "--tiny"])
