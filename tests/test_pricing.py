"""Pricing: the shipped sheets, every basis, rounding, billing and broken sheets."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.domain.job import ImageJob, JobKind, ReferenceImage
from gateway.routing.pricing import (
    GpuTime,
    PerImage,
    PerMegapixel,
    PriceSheetError,
    TieredMegapixel,
    bill,
    load_sheet,
    load_sheets,
    parse_sheet,
    quote,
    usd,
)

PRICING_DIR = Path(__file__).resolve().parents[1] / "pricing"
REF = ReferenceImage(content_type="image/png", data=b"\x89PNG")


def job(w: int = 1024, h: int = 1024, n: int = 1, refs: int = 0, steps: int = 4) -> ImageJob:
    kind = JobKind.EDIT if refs else JobKind.GENERATE
    return ImageJob(kind=kind, prompt="a fox", width=w, height=h, n=n, steps=steps, references=(REF,) * refs)


@pytest.fixture(scope="module")
def sheets():
    return load_sheets(PRICING_DIR)


# --- the shipped sheets and docs/design.md#worked-examples ---------


def test_shipped_sheets_load_one_per_backend_with_sources(sheets):
    assert set(sheets) == {"fal", "replicate", "runflow", "empiriolabs", "local"}
    assert {name: s.basis for name, s in sheets.items()} == {
        "fal": "per_megapixel",
        "replicate": "per_megapixel",
        "runflow": "tiered_megapixel",
        "empiriolabs": "per_image",
        "local": "gpu_time",
    }
    for sheet in sheets.values():
        assert sheet.currency == "USD"
        assert "https://" in sheet.source


@pytest.mark.parametrize(
    ("backend", "refs", "expected"),
    [
        ("fal", 0, "0.00524288"),
        ("replicate", 0, "0.00104858"),
        ("runflow", 0, "0.01404858"),
        ("empiriolabs", 0, "0.0085"),
        # 2.50/3600 x 0.57 x 1.048576 = 0.000415061333... ("about $0.000415")
        ("local", 0, "0.00041506"),
        ("fal", 2, "0.03048576"),
        ("replicate", 2, "0.00304858"),
        ("runflow", 2, "0.005"),
        ("empiriolabs", 2, "0.0085"),
    ],
)
def test_worked_examples_quote_and_bill_exactly(sheets, backend, refs, expected):
    one = job(1024, 1024, n=1, refs=refs)
    q = quote(sheets[backend], one)
    assert q.usd == Decimal(expected)
    assert q.usd.as_tuple().exponent == -8  # always 8 decimal places
    assert q.basis == sheets[backend].basis
    assert bill(sheets[backend], one, images_returned=1) == Decimal(expected)


@pytest.mark.parametrize(
    ("size", "n", "fal", "replicate", "runflow", "empiriolabs"),
    [
        ((512, 512), 1, "0.00131072", "0.00026214", "0.014", "0.0085"),
        ((1024, 768), 2, "0.00786432", "0.00157286", "0.028", "0.017"),
        ((1360, 768), 3, "0.0156672", "0.00313344", "0.04213344", "0.0255"),
        ((2048, 2048), 4, "0.08388608", "0.01677722", "0.06877722", "0.034"),
        ((1024, 1024), 4, "0.02097152", "0.0041943", "0.05619430", "0.034"),
    ],
)
def test_text_to_image_prices_across_sizes_and_counts(sheets, size, n, fal, replicate, runflow, empiriolabs):
    j = job(*size, n=n)
    got = {b: quote(sheets[b], j).usd for b in ("fal", "replicate", "runflow", "empiriolabs")}
    assert got == {
        "fal": Decimal(fal),
        "replicate": Decimal(replicate),
        "runflow": Decimal(runflow),
        "empiriolabs": Decimal(empiriolabs),
    }


@pytest.mark.parametrize(
    ("refs", "fal", "replicate"),
    [
        (1, "0.02048576", "0.00204858"),
        (2, "0.03048576", "0.00304858"),
        (3, "0.04048576", "0.00404858"),
        (4, "0.05048576", "0.00504858"),
    ],
)
def test_edits_charge_each_reference_as_one_megapixel(sheets, refs, fal, replicate):
    j = job(1024, 1024, refs=refs)
    assert quote(sheets["fal"], j).usd == Decimal(fal)
    assert quote(sheets["replicate"], j).usd == Decimal(replicate)
    # Flat per-image edit prices ignore the number of references.
    assert quote(sheets["runflow"], j).usd == Decimal("0.005")
    assert quote(sheets["empiriolabs"], j).usd == Decimal("0.0085")


def test_edit_input_megapixels_are_charged_once_per_request_not_per_image(sheets):
    # $0.010 x (2 x 0.786432 + 3 x 1) MP
    assert quote(sheets["fal"], job(1024, 768, n=2, refs=3)).usd == Decimal("0.04572864")
    assert quote(sheets["runflow"], job(1024, 768, n=2, refs=3)).usd == Decimal("0.01")


def test_quote_breakdown_shows_the_arithmetic(sheets):
    assert quote(sheets["fal"], job(refs=2)).breakdown == ("(1 x 1.048576 MP output + 2 x 1 MP input) x $0.01/MP")
    assert quote(sheets["empiriolabs"], job(n=3)).breakdown == "3 x $0.0085/image"


# --- rounding -----------------------------------------------------------------


def per_mp(**kw) -> PerMegapixel:
    fields = {"backend": "x", "basis": "per_megapixel", "source": "test", "usd_per_mp": "0.01"}
    return parse_sheet({**fields, **kw})


@pytest.mark.parametrize(
    ("size", "step", "expected"),
    [
        ((1024, 768), "1", "0.01"),  # 0.786 MP -> 1 MP
        ((1024, 1024), "1", "0.02"),  # 1.049 MP -> 2 MP
        ((1000, 1000), "1", "0.01"),  # exactly 1 MP stays 1 MP
        ((2048, 2048), "1", "0.05"),  # 4.194 MP -> 5 MP
        ((1360, 768), "0.5", "0.015"),  # 1.044 MP -> 1.5 MP
        ((512, 512), "0.25", "0.0050"),  # 0.262 MP -> 0.5 MP
    ],
)
def test_ceil_rounding_bills_whole_steps_per_image(size, step, expected):
    sheet = per_mp(rounding="ceil", ceil_step_mp=step)
    assert quote(sheet, job(*size)).usd == Decimal(expected)
    assert quote(sheet, job(*size, n=3)).usd == 3 * Decimal(expected)


def test_exact_rounding_is_the_default():
    assert per_mp().rounding == "exact"
    assert quote(per_mp(), job(1024, 768)).usd == Decimal("0.00786432")


def test_ceil_rounding_applies_to_reference_megapixels_too():
    sheet = per_mp(rounding="ceil", edit_charges_input=True, edit_input_mp_per_reference="1.048576")
    # outputs: ceil(0.786) = 1 MP; each reference ceil(1.049) = 2 MP -> (1 + 2 x 2) x $0.01
    assert quote(sheet, job(1024, 768, refs=2)).usd == Decimal("0.05")


def test_per_megapixel_edits_charge_only_outputs_unless_the_sheet_says_so():
    assert quote(per_mp(), job(refs=3)).usd == Decimal("0.01048576")
    assert quote(per_mp(edit_usd_per_mp="0.02"), job(refs=3)).usd == Decimal("0.02097152")


# --- tiered megapixels --------------------------------------------------------


def tiered(**kw) -> TieredMegapixel:
    fields = {
        "backend": "t",
        "basis": "tiered_megapixel",
        "source": "test",
        "first_mp_usd": "0.014",
        "extra_mp_usd": "0.001",
    }
    return parse_sheet({**fields, **kw})


@pytest.mark.parametrize(
    ("size", "rounding", "expected"),
    [
        ((256, 256), "exact", "0.014"),  # below 1 MP still pays the first MP
        ((512, 512), "exact", "0.014"),
        ((1024, 768), "exact", "0.014"),
        ((1024, 1024), "exact", "0.01404858"),
        ((2048, 2048), "exact", "0.01719430"),
        ((1024, 768), "ceil", "0.014"),
        ((1024, 1024), "ceil", "0.015"),  # 2 MP: first + one further
        ((2048, 2048), "ceil", "0.018"),  # 5 MP: first + four further
    ],
)
def test_tiered_first_and_further_megapixels(size, rounding, expected):
    assert quote(tiered(rounding=rounding), job(*size)).usd == Decimal(expected)


def test_tiered_edit_inputs_follow_bfl_formula_when_no_flat_edit_price():
    # BFL's formula (https://docs.bfl.ai/quick_start/pricing.md): 1024x768 output, one ~1.049 MP input.
    exact = tiered(edit_input_mp_per_reference="1.048576")
    ceil = tiered(edit_input_mp_per_reference="1.048576", rounding="ceil")
    assert quote(exact, job(1024, 768, refs=1)).usd == Decimal("0.01504858")  # ~1.505 cents, as BFL's formula works it
    assert quote(ceil, job(1024, 768, refs=1)).usd == Decimal("0.016")
    assert quote(tiered(), job(1024, 768, refs=1)).usd == Decimal("0.014")  # inputs free


# --- per image and GPU time ---------------------------------------------------


def test_per_image_edit_price_defaults_to_generation_price():
    sheet = parse_sheet({"backend": "p", "basis": "per_image", "source": "s", "usd_per_image": "0.002"})
    assert isinstance(sheet, PerImage)
    assert quote(sheet, job(refs=4, n=2)).usd == Decimal("0.004")
    priced = parse_sheet({**sheet.model_dump(), "edit_usd_per_image": "0.003"})
    assert quote(priced, job(refs=1, n=2)).usd == Decimal("0.006")
    assert quote(priced, job(n=2)).usd == Decimal("0.004")


def gpu(**kw) -> GpuTime:
    fields = {
        "backend": "local",
        "basis": "gpu_time",
        "source": "test",
        "gpu_usd_per_hour": "2.50",
        "seconds_per_image": "0.57",
    }
    return parse_sheet({**fields, **kw})


@pytest.mark.parametrize(
    ("kw", "j", "expected"),
    [
        ({}, job(1024, 1024), "0.00041506"),
        ({}, job(512, 512), "0.00010377"),  # a quarter of the pixels
        ({}, job(1024, 1024, steps=8), "0.00083012"),  # twice the steps
        ({}, job(1024, 1024, n=3), "0.00124518"),
        ({}, job(1024, 1024, refs=2), "0.00041506"),  # edits: same as t2i
        ({"reference_mp": "1.048576"}, job(1024, 1024), "0.00039583"),
        ({"mode": "amortized", "utilisation": "0.3"}, job(1024, 1024), "0.00138354"),
        ({"mode": "amortised", "utilisation": "0.5"}, job(1024, 1024), "0.00083012"),
        ({"mode": "marginal", "utilisation": "0.3"}, job(1024, 1024), "0.00041506"),
    ],
)
def test_gpu_time_scales_with_megapixels_steps_and_utilisation(kw, j, expected):
    assert quote(gpu(**kw), j).usd == Decimal(expected)


@pytest.mark.parametrize(
    ("j", "expected"),
    [
        (job(1024, 1024), "0.00020972"),  # 0.0002 x 1.048576
        (job(1024, 1024, n=2, steps=8), "0.00083886"),  # x 2 images x 2 (steps)
        (job(1000, 1000), "0.0002"),
    ],
)
def test_live_gpu_figure_replaces_the_sheet_and_scales_by_job(j, expected):
    live = Decimal("0.0002")
    assert quote(gpu(), j, live_usd_per_image=live).usd == Decimal(expected)
    assert "live $0.0002/image" in quote(gpu(), j, live_usd_per_image=live).breakdown
    assert bill(gpu(), j, j.n, live_usd_per_image=live) == Decimal(expected)


def test_live_figure_is_ignored_by_hosted_sheets(sheets):
    assert quote(sheets["fal"], job(), live_usd_per_image=Decimal("9")).usd == Decimal("0.00524288")


# --- billing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "j", "returned", "expected"),
    [
        ("fal", job(n=4), 2, "0.01048576"),
        ("fal", job(n=4), 4, "0.02097152"),
        ("fal", job(n=2, refs=2), 1, "0.03048576"),  # inputs still billed once
        ("fal", job(n=2, refs=2), 0, "0"),  # failed attempt: nothing
        ("runflow", job(n=3, refs=2), 2, "0.01"),
        ("runflow", job(n=3), 0, "0"),
        ("empiriolabs", job(n=4), 3, "0.0255"),
        ("local", job(n=2), 1, "0.00041506"),
    ],
)
def test_bill_charges_only_for_images_returned(sheets, backend, j, returned, expected):
    assert bill(sheets[backend], j, images_returned=returned) == Decimal(expected)


def test_bill_refuses_a_negative_image_count(sheets):
    with pytest.raises(ValueError):
        bill(sheets["fal"], job(), images_returned=-1)


# --- broken sheets ------------------------------------------------------------

GOOD = "backend: fal\nbasis: per_megapixel\nsource: test\nusd_per_mp: 0.005\n"


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("backend: fal\nbasis: per_megapixel\nsource: test\n", "usd_per_mp", "Field required"),
        (GOOD.replace("0.005", "-0.005"), "usd_per_mp", "greater than or equal to 0"),
        (GOOD.replace("per_megapixel", "per_token"), "basis", "unknown basis 'per_token'"),
        (GOOD.replace("basis: per_megapixel\n", ""), "basis", "Field required"),
        (GOOD.replace("source: test\n", ""), "source", "Field required"),
        (GOOD + "usd_per_megapixel: 0.1\n", "usd_per_megapixel", "Extra inputs are not permitted"),
        (GOOD + "currency: EUR\n", "currency", "Input should be 'USD'"),
        (GOOD + "rounding: floor\n", "rounding", "'exact' or 'ceil'"),
        (GOOD + "ceil_step_mp: 0\n", "ceil_step_mp", "greater than 0"),
        (GOOD.replace("0.005", "abc"), "usd_per_mp", "valid decimal"),
        ("- fal\n- replicate\n", "(top level)", "expected a mapping"),
        ("", "(top level)", "got nothing"),
        ("backend: [unclosed\n", "line", "invalid YAML"),
        (
            "backend: local\nbasis: gpu_time\nsource: s\ngpu_usd_per_hour: 2.5\nseconds_per_image: 0.57\nutilisation: 1.5\n",
            "utilisation",
            "less than or equal to 1",
        ),
    ],
)
def test_broken_sheet_error_names_file_field_and_problem(tmp_path, text, field, problem):
    path = tmp_path / "fal.yaml"
    path.write_text(text)
    with pytest.raises(PriceSheetError) as err:
        load_sheet(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {field}")
    assert problem in message


def test_negative_price_message_reads_file_field_problem(tmp_path):
    path = tmp_path / "fal.yaml"
    path.write_text(GOOD.replace("0.005", "-1"))
    with pytest.raises(PriceSheetError, match=r"fal\.yaml: usd_per_mp: Input should be greater than or equal to 0$"):
        load_sheet(path)


def test_load_sheets_rejects_two_sheets_for_one_backend(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD)
    with pytest.raises(PriceSheetError, match=r"b\.yml: backend: 'fal' is already priced by .*a\.yaml"):
        load_sheets(tmp_path)


def test_load_sheets_reports_the_broken_file_among_good_ones(tmp_path):
    (tmp_path / "fal.yaml").write_text(GOOD)
    (tmp_path / "zz.yaml").write_text(GOOD.replace("fal", "zz").replace("0.005", "-2"))
    with pytest.raises(PriceSheetError, match=r"zz\.yaml: usd_per_mp"):
        load_sheets(tmp_path)


def test_load_sheets_on_a_missing_directory_names_it(tmp_path):
    with pytest.raises(PriceSheetError, match="not a directory"):
        load_sheets(tmp_path / "nope")


def test_a_price_change_needs_no_code_change(tmp_path):
    (tmp_path / "fal.yaml").write_text(GOOD.replace("0.005", "0.009"))
    assert quote(load_sheets(tmp_path)["fal"], job()).usd == Decimal("0.00943718")


# --- remembered figures --------------------------------------------------------

SHEET_EXTRAS = [
    {"backend": "gpu-amortized", "source": "test", "basis": "gpu_time", "gpu_usd_per_hour": "2.5", "seconds_per_image": "0.57", "mode": "amortized", "utilisation": "0.6"},
    {"backend": "tiered-edit", "source": "test", "basis": "tiered_megapixel", "first_mp_usd": "0.014", "extra_mp_usd": "0.001", "rounding": "ceil", "edit_input_mp_per_reference": "1"},
    {"backend": "mp-edit", "source": "test", "basis": "per_megapixel", "usd_per_mp": "0.003", "edit_usd_per_mp": "0.004", "edit_charges_input": True, "rounding": "ceil", "ceil_step_mp": "0.5"},
]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=7),
    st.sampled_from([256, 512, 768, 1000, 1024, 1344, 2048]),
    st.sampled_from([256, 768, 1024, 1536]),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=1, max_value=8),
    st.sampled_from([None, Decimal("0"), Decimal("0.0004"), Decimal("0.00040")]),
    st.integers(min_value=0, max_value=4),
    st.text(max_size=5),
)
def test_remembered_quotes_and_bills_equal_the_sheet_worked_out_afresh(which, w, h, n, refs, steps, live, returned, prompt):
    """Whatever else differs between two jobs (prompt, seed, format, caller),
    a remembered figure is the one the sheet gives for this job."""
    sheets = [*load_sheets(PRICING_DIR).values(), *(parse_sheet(d) for d in SHEET_EXTRAS)]
    sheet = sheets[which % len(sheets)]
    one = ImageJob(JobKind.EDIT if refs else JobKind.GENERATE, prompt, w, h, n=n, steps=steps, references=(REF,) * refs, seed=len(prompt), output_format="webp" if prompt else "png")
    for _ in range(2):  # the second time from memory
        q = quote(sheet, one, live)
        total, breakdown = sheet.cost(one, n, live if isinstance(sheet, GpuTime) and live is not None else None)
        assert (q.usd, q.basis, q.breakdown) == (usd(total), sheet.basis, breakdown)
        afresh = usd(sheet.cost(one, returned, live if isinstance(sheet, GpuTime) and live is not None else None)[0]) if returned else usd(Decimal(0))
        assert bill(sheet, one, returned, live) == afresh


def test_a_sheet_loaded_again_is_priced_by_its_own_figures_not_a_remembered_one():
    a = parse_sheet({"backend": "x", "source": "test", "basis": "per_image", "usd_per_image": "0.01"})
    b = parse_sheet({"backend": "x", "source": "test", "basis": "per_image", "usd_per_image": "0.02"})
    assert quote(a, job()).usd == Decimal("0.01")
    assert quote(b, job()).usd == Decimal("0.02")
    assert bill(b, job(), 1) == Decimal("0.02")
