"""Eligibility as a table: (job, backend capabilities) -> ok, or the reason and param."""

from __future__ import annotations

import pytest

from gateway.domain.capabilities import Capabilities, eligible
from gateway.domain.job import ImageJob, JobKind, ReferenceImage

UPLOAD = ReferenceImage(content_type="image/png", data=b"\x89PNG", width=1024, height=1024)
LINKED = ReferenceImage(content_type="image/png", url="https://example.com/ref.png")

DEFAULT = Capabilities()
# Replicate makes only (aspect ratio, 1 MP) sizes (docs/providers/replicate.md#sizes).
REPLICATE = Capabilities(
    exact_sizes=frozenset({(1024, 1024), (1365, 768), (768, 1365), (1254, 836), (836, 1254)}),
    accepts_data_uri_refs=False,
)
# EmpirioLabs: sides 256 to 2048, W x H <= 1,048,576, steps 1 to 12 (docs/providers/empiriolabs.md#capabilities).
EMPIRIO = Capabilities(min_side=256, max_pixels=1_048_576, max_steps=12)
T2I_ONLY = Capabilities(edit=False, max_references=0)
EDIT_ONLY = Capabilities(text_to_image=False)


def job(w: int = 1024, h: int = 1024, *, n: int = 1, steps: int = 4, refs=(), seed=None, fmt="png") -> ImageJob:
    kind = JobKind.EDIT if refs else JobKind.GENERATE
    return ImageJob(
        kind=kind,
        prompt="a fox",
        width=w,
        height=h,
        n=n,
        steps=steps,
        references=tuple(refs),
        seed=seed,
        output_format=fmt,
    )


OK = (True, "", None)

CASES = [
    # (id, job, capabilities, (ok, reason contains, param))
    ("square 1 MP", job(), DEFAULT, OK),
    ("smallest side", job(64, 64), DEFAULT, OK),
    ("largest image", job(2048, 2048), DEFAULT, OK),
    ("off the 16 grid", job(1000, 1000), DEFAULT, (False, "multiples of 16", "size")),
    ("one side off the grid", job(1024, 1000), DEFAULT, (False, "multiples of 16", "size")),
    ("side too small", job(48, 1024), DEFAULT, (False, "64 to 2048", "size")),
    ("side too large", job(2064, 1024), DEFAULT, (False, "64 to 2048", "size")),
    ("too many pixels", job(1440, 1440), Capabilities(max_pixels=2_000_000), (False, "at most 2,000,000 pixels", "size")),
    ("a size Replicate makes", job(1024, 1024), REPLICATE, OK),
    ("Replicate size off the grid", job(1365, 768), REPLICATE, OK),
    ("a size Replicate cannot make", job(1024, 768), REPLICATE, (False, "cannot produce exactly 1024x768", "size")),
    ("EmpirioLabs cap exactly", job(1024, 1024), EMPIRIO, OK),
    ("EmpirioLabs wide", job(2048, 512), EMPIRIO, OK),
    ("EmpirioLabs 1344x768", job(1344, 768), EMPIRIO, OK),
    ("EmpirioLabs over the cap", job(1040, 1024), EMPIRIO, (False, "at most 1,048,576 pixels", "size")),
    ("EmpirioLabs 2048 square", job(2048, 2048), EMPIRIO, (False, "at most 1,048,576 pixels", "size")),
    ("EmpirioLabs min side", job(256, 256), EMPIRIO, OK),
    ("EmpirioLabs side below 256", job(240, 1024), EMPIRIO, (False, "256 to 2048", "size")),
    ("EmpirioLabs 1 step", job(steps=1), EMPIRIO, OK),
    ("EmpirioLabs 12 steps", job(steps=12), EMPIRIO, OK),
    ("EmpirioLabs 13 steps", job(steps=13), EMPIRIO, (False, "must be 1 to 12", "num_inference_steps")),
    ("0 steps", job(steps=0), EMPIRIO, (False, "must be 1 to 12", "num_inference_steps")),
    ("50 steps by default", job(steps=50), DEFAULT, OK),
    ("51 steps", job(steps=51), DEFAULT, (False, "must be 1 to 50", "num_inference_steps")),
    ("fixed steps match", job(steps=4), Capabilities(fixed_steps=4), OK),
    ("fixed steps differ", job(steps=8), Capabilities(fixed_steps=4), (False, "always runs 4 steps", "num_inference_steps")),
    ("four images", job(n=4), DEFAULT, OK),
    ("n too high", job(n=5), DEFAULT, (False, "at most 4 images", "n")),
    ("n above a backend's max", job(n=2), Capabilities(max_n=1), (False, "at most 1 images", "n")),
    ("four references", job(refs=[UPLOAD] * 4), DEFAULT, OK),
    ("too many references", job(refs=[UPLOAD] * 5), DEFAULT, (False, "at most 4 reference images", "image")),
    ("references above a backend's max", job(refs=[LINKED] * 2), Capabilities(max_references=1), (False, "at most 1 reference", "image")),
    ("edit on a text-to-image backend", job(refs=[UPLOAD]), T2I_ONLY, (False, "does not support edits", "image")),
    ("text-to-image on an edit backend", job(), EDIT_ONLY, (False, "does not support text-to-image", "prompt")),
    ("edit on an edit backend", job(refs=[UPLOAD]), EDIT_ONLY, OK),
    ("upload to a URL-only backend", job(refs=[UPLOAD]), REPLICATE, (False, "public URLs", "image")),
    ("URLs to a URL-only backend", job(refs=[LINKED, LINKED]), REPLICATE, OK),
    ("one upload among URLs", job(refs=[LINKED, UPLOAD]), REPLICATE, (False, "public URLs", "image")),
    ("seed where seeds are ignored", job(seed=7), Capabilities(seed=False), (False, "does not accept a seed", "seed")),
    ("no seed where seeds are ignored", job(), Capabilities(seed=False), OK),
    # Formats are transcoded by result shaping, so they never make a backend ineligible.
    ("webp from a png-only backend", job(fmt="webp"), Capabilities(output_formats=frozenset({"png"})), OK),
]


@pytest.mark.parametrize(("j", "caps", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_eligibility_table(j, caps, expected):
    ok, reason, param = expected
    result = eligible(j, caps)
    assert bool(result) is ok
    assert result.ok is ok
    if ok:
        assert result.reason == "" and result.param is None
    else:
        assert reason in result.reason
        assert result.param == param


def test_overrides_from_config_parse_sizes_and_formats():
    caps = DEFAULT.merged({"exact_sizes": ["1024x1024", [768, 1365]], "max_n": 2, "output_formats": ["png"]})
    assert caps.exact_sizes == frozenset({(1024, 1024), (768, 1365)})
    assert caps.output_formats == frozenset({"png"})
    assert eligible(job(768, 1365, n=2), caps).ok
    assert not eligible(job(1024, 768), caps).ok
    assert DEFAULT.merged(None) is DEFAULT


@pytest.mark.parametrize(
    ("refs", "reachable", "ok"),
    [
        ([UPLOAD], True, True),  # the gateway lends the upload a signed URL
        ([UPLOAD], False, False),
        ([LINKED, UPLOAD], True, True),
        ([LINKED], False, True),  # a caller's URL needs nothing lent
    ],
)
def test_uploads_reach_a_url_only_backend_only_when_they_can_be_lent_a_url(refs, reachable, ok):
    result = eligible(job(refs=refs), REPLICATE, uploads_reachable=reachable)
    assert result.ok is ok
    if not ok:
        assert "public_base_url" in result.reason and result.param == "image"
