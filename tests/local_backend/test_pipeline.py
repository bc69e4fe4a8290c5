"""The tiny pipeline and the real loading path, on CPU, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402 - after importorskip, so the module skips without torch
from PIL import Image  # noqa: E402 - after importorskip

from local_backend.config import Settings  # noqa: E402 - after importorskip
from local_backend.pipeline import (  # noqa: E402 - after importorskip
    BatchCall,
    PipelineGenerator,
    build_generator,
    encoder_out_layers,
    load_pipeline,
    tiny_pipeline,
)

STEPS = 2


@pytest.fixture(scope="module")
def tiny() -> PipelineGenerator:
    return PipelineGenerator(tiny_pipeline(), "cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("klein-tiny")
    tiny_pipeline().save_pretrained(folder)
    return folder


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def one(generator: PipelineGenerator, prompt: str, seed: int, **kw: Any) -> Image.Image:
    (image,) = generator.generate(BatchCall([prompt], [seed], 64, 64, STEPS, **kw))
    return image


def test_offline_mode_is_on() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tiny_pipeline_builds_in_code_and_generates(tiny: PipelineGenerator) -> None:
    images = tiny.generate(BatchCall(["a fox", "a cat"], [1, 2], 64, 48, STEPS))
    assert [image.size for image in images] == [(64, 48), (64, 48)]
    assert type(tiny.pipe).__name__ == "Flux2KleinPipeline" and tiny.pipe.config.is_distilled
    assert encoder_out_layers(tiny.pipe) == (1, 2, 3)


def test_same_seed_same_image_other_seed_other_image(tiny: PipelineGenerator) -> None:
    first, again, other = one(tiny, "a fox", 5), one(tiny, "a fox", 5), one(tiny, "a fox", 6)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_a_batched_image_equals_the_single_call_with_its_seed(tiny: PipelineGenerator) -> None:
    batched = tiny.generate(BatchCall(["a fox", "a cat", "a dog"], [5, 6, 7], 64, 64, STEPS))
    for prompt, seed, image in zip(["a fox", "a cat", "a dog"], [5, 6, 7], batched, strict=True):
        assert np.abs(pixels(image) - pixels(one(tiny, prompt, seed))).max() <= 2  # fp32 CPU, 8-bit output


def test_reference_images_take_the_edit_path(tiny: PipelineGenerator) -> None:
    reference = Image.new("RGB", (64, 64), (200, 10, 10))
    edited = one(tiny, "a fox", 5, references=[reference])
    assert edited.size == (64, 64)
    assert not np.array_equal(pixels(edited), pixels(one(tiny, "a fox", 5)))


def test_real_loading_path_from_a_saved_folder(saved: Path, tiny: PipelineGenerator) -> None:
    loaded = PipelineGenerator(load_pipeline(Settings(model_path=saved, device="cpu")), "cpu")
    assert loaded.pipe.dtype == torch.float32
    assert encoder_out_layers(loaded.pipe) == (1, 2, 3)
    # tiny_pipeline() is deterministic (seeded), so the saved copy equals the module's one
    assert np.array_equal(pixels(one(loaded, "a fox", 5)), pixels(one(tiny, "a fox", 5)))


def test_build_generator_loads_real_folders_and_tiny(saved: Path) -> None:
    assert build_generator(Settings(model_path=saved, device="cpu")).device == "cpu"
    assert build_generator(Settings(tiny=True, device="auto")).device == "cpu"  # no GPU here


def test_only_the_distilled_model_is_served(saved: Path, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(saved, base)
    index = json.loads((base / "model_index.json").read_text())
    index["is_distilled"] = False
    (base / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is_distilled"):
        load_pipeline(Settings(model_path=base, device="cpu"))


def test_missing_model_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_pipeline(Settings(model_path=tmp_path / "nowhere", device="cpu"))
