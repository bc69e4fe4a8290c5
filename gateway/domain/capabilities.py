"""What each backend can do, as data, and the one pure eligibility check.

A backend that would silently change the request (another size, fewer images,
fewer steps) is not eligible for it: the caller gets what they asked for or a
clear refusal, never a quiet substitute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.domain.job import ImageJob, JobKind

# Model-wide limits (docs/design.md#model-limits-and-eligibility; BFL: width/height >= 64, multiples
# of 16, <= 4 MP; https://docs.bfl.ml/api-reference/models/generate-or-edit-an-image-with-flux2-[klein-4b]).
MODEL_MIN_SIDE = 64
MODEL_MAX_SIDE = 2048
MODEL_MULTIPLE = 16
MODEL_MAX_PIXELS = 2048 * 2048
MODEL_MAX_N = 4
MODEL_MAX_STEPS = 50
MODEL_MAX_REFERENCES = 4


@dataclass(frozen=True, slots=True)
class Capabilities:
    min_side: int = MODEL_MIN_SIDE
    max_side: int = MODEL_MAX_SIDE
    multiple_of: int = MODEL_MULTIPLE
    max_pixels: int = MODEL_MAX_PIXELS
    # When set, only these exact (width, height) pairs can be produced
    # (Replicate's klein takes an aspect ratio and a megapixel count, not sizes).
    exact_sizes: frozenset[tuple[int, int]] | None = None
    max_n: int = MODEL_MAX_N
    min_steps: int = 1
    max_steps: int = MODEL_MAX_STEPS
    fixed_steps: int | None = None  # the backend ignores the step count and always runs this many
    text_to_image: bool = True
    edit: bool = True
    max_references: int = MODEL_MAX_REFERENCES
    # Reference images can be sent inline as data: URIs. When False, the
    # backend needs a public https URL, so uploaded bytes are not eligible.
    accepts_data_uri_refs: bool = True
    # Reference images can be sent as the caller's URLs. When False (the local
    # GPU takes bytes), the gateway fetches them first, with its SSRF guard.
    accepts_url_refs: bool = True
    output_formats: frozenset[str] = frozenset({"png", "jpeg", "webp"})
    seed: bool = True

    def merged(self, overrides: dict[str, Any] | None) -> Capabilities:
        """These capabilities with providers.yaml overrides applied."""
        if not overrides:
            return self
        fixed = dict(overrides)
        if "exact_sizes" in fixed and fixed["exact_sizes"] is not None:
            fixed["exact_sizes"] = frozenset(_parse_size(s) for s in fixed["exact_sizes"])
        if "output_formats" in fixed:
            fixed["output_formats"] = frozenset(fixed["output_formats"])
        return replace(self, **fixed)


def _parse_size(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        w, _, h = value.lower().partition("x")
        return int(w), int(h)
    w, h = value
    return int(w), int(h)


@dataclass(frozen=True, slots=True)
class Eligibility:
    ok: bool
    reason: str = ""
    param: str | None = None

    def __bool__(self) -> bool:
        return self.ok


ELIGIBLE = Eligibility(True)
UPLOADS_UNREACHABLE = (
    "needs reference images as public URLs; uploads get a short-lived signed one only when gateway.public_base_url (or KLEIN_PUBLIC_BASE_URL) is set, or an s3 image store presigns its URLs"
)


def eligible(job: ImageJob, caps: Capabilities, *, uploads_reachable: bool = False) -> Eligibility:
    """Can this backend do exactly this job? Pure; the reason names the limit.

    `job` is the job at the size this backend would produce
    (gateway.domain.native_sizes.as_served). `uploads_reachable`: the gateway can
    give uploaded references a short-lived URL (gateway.dispatch.upload_links), so a
    backend that takes references as URLs only can still take uploads."""
    w, h = job.width, job.height
    if job.kind is JobKind.EDIT and not caps.edit:
        return Eligibility(False, "does not support edits", "image")
    if job.kind is JobKind.GENERATE and not caps.text_to_image:
        return Eligibility(False, "does not support text-to-image", "prompt")
    if caps.exact_sizes is not None:
        if (w, h) not in caps.exact_sizes:
            if job.size_intent.exact:
                return Eligibility(False, f"cannot produce exactly {w}x{h}", "size")
            return Eligibility(False, f"cannot produce {w}x{h} or a native size near it", "size")
    else:
        if w % caps.multiple_of or h % caps.multiple_of:
            return Eligibility(False, f"width and height must be multiples of {caps.multiple_of}", "size")
        if not (caps.min_side <= w <= caps.max_side and caps.min_side <= h <= caps.max_side):
            return Eligibility(False, f"width and height must be {caps.min_side} to {caps.max_side}", "size")
    if w * h > caps.max_pixels:
        return Eligibility(False, f"at most {caps.max_pixels:,} pixels per image", "size")
    if job.n > caps.max_n:
        return Eligibility(False, f"at most {caps.max_n} images per request", "n")
    if caps.fixed_steps is not None and job.steps != caps.fixed_steps:
        return Eligibility(False, f"always runs {caps.fixed_steps} steps", "num_inference_steps")
    if not caps.min_steps <= job.steps <= caps.max_steps:
        return Eligibility(False, f"num_inference_steps must be {caps.min_steps} to {caps.max_steps}", "num_inference_steps")
    if len(job.references) > caps.max_references:
        return Eligibility(False, f"at most {caps.max_references} reference images", "image")
    if not caps.accepts_data_uri_refs and not uploads_reachable and any(ref.url is None for ref in job.references):
        return Eligibility(False, UPLOADS_UNREACHABLE, "image")
    if job.seed is not None and not caps.seed:
        return Eligibility(False, "does not accept a seed", "seed")
    return ELIGIBLE
