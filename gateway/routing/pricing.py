"""Price sheets and the pure pricing of one job on one backend.

A price sheet is data (one YAML file per backend under `pricing/`), so a price
change never needs a code change. `quote()` says what a job will cost before it
runs; `bill()` what it did cost once we know how many images came back. Both are
pure (no I/O, no clock); money is `Decimal`, quantized to 1e-8 USD half up.

Choices where the documents are silent (docs/design.md#pricing):
- `ceil` rounding applies to each billed quantity on its own: each output
  image's MP and each reference's input MP, not to the request's sum.
- Edit input MP is charged once per request (k references), not per image:
  "(n x output MP + k x 1 MP)".
- A request that returned no image bills nothing (failed runs are not billed:
  docs/design.md#what-is-billed), even where a successful edit would bill inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from gateway.domain.job import ImageJob, JobKind

USD_QUANTUM = Decimal("0.00000001")
SECONDS_PER_HOUR = Decimal(3600)
NonNegative = Annotated[Decimal, Field(ge=0)]
Positive = Annotated[Decimal, Field(gt=0)]


class PriceSheetError(ValueError):
    """A price sheet that cannot be used; the message names file, field and problem."""


@dataclass(frozen=True, slots=True)
class Quote:
    usd: Decimal
    basis: str
    breakdown: str


def usd(value: Decimal) -> Decimal:
    """Money as the gateway reports it: 8 decimal places, half up."""
    return value.quantize(USD_QUANTUM, rounding=ROUND_HALF_UP)


def usd_text(value: Decimal) -> str:
    """Money as text for headers and JSON: no trailing zeros, never exponent form."""
    return f"{usd(value).normalize():f}"


def _fmt(value: Decimal) -> str:
    return f"{value.normalize():f}"


class _Sheet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field(min_length=1)
    currency: Literal["USD"] = "USD"
    source: str = Field(min_length=1)  # where the figures come from
    effective_from: date | None = None
    notes: str | None = None

    def cost(self, job: ImageJob, images: int, live: Decimal | None) -> tuple[Decimal, str]:
        raise NotImplementedError


class _Rounded(_Sheet):
    rounding: Literal["exact", "ceil"] = "exact"
    ceil_step_mp: Positive = Decimal(1)

    def billed_mp(self, mp: Decimal) -> Decimal:
        if self.rounding == "exact":
            return mp
        steps = (mp / self.ceil_step_mp).to_integral_value(rounding=ROUND_CEILING)
        return steps * self.ceil_step_mp


class PerMegapixel(_Rounded):
    """`usd_per_mp` x output MP x images; edits optionally add k x reference MP."""

    basis: Literal["per_megapixel"]
    usd_per_mp: NonNegative
    edit_usd_per_mp: NonNegative | None = None  # defaults to usd_per_mp
    edit_charges_input: bool = False
    # Each reference is billed as this many MP whatever its real size (fal's
    # convention on the 9B edit endpoint, docs/providers/fal.md#price).
    edit_input_mp_per_reference: NonNegative = Decimal(1)

    def cost(self, job: ImageJob, images: int, live: Decimal | None) -> tuple[Decimal, str]:
        out_mp = self.billed_mp(job.megapixels)
        if job.kind is not JobKind.EDIT:
            total = images * out_mp * self.usd_per_mp
            return total, f"{images} x {_fmt(out_mp)} MP x ${_fmt(self.usd_per_mp)}/MP"
        rate = self.usd_per_mp if self.edit_usd_per_mp is None else self.edit_usd_per_mp
        k = len(job.references) if self.edit_charges_input else 0
        in_mp = self.billed_mp(self.edit_input_mp_per_reference)
        total = (images * out_mp + k * in_mp) * rate
        text = f"({images} x {_fmt(out_mp)} MP output + {k} x {_fmt(in_mp)} MP input) x ${_fmt(rate)}/MP"
        return total, text


class TieredMegapixel(_Rounded):
    """Per image: `first_mp_usd` for the first MP (a minimum), `extra_mp_usd` per
    further MP; the BFL list price that Runflow's FAQ quotes (docs/providers/runflow.md#price)."""

    basis: Literal["tiered_megapixel"]
    first_mp_usd: NonNegative
    extra_mp_usd: NonNegative
    edit_usd_per_image: NonNegative | None = None  # flat edit price (Runflow 4B edit)
    # Without a flat edit price: each reference billed as this many MP at
    # extra_mp_usd, as in BFL's formula (docs/design.md#tiered_megapixel); None: free.
    edit_input_mp_per_reference: NonNegative | None = None

    def cost(self, job: ImageJob, images: int, live: Decimal | None) -> tuple[Decimal, str]:
        if job.kind is JobKind.EDIT and self.edit_usd_per_image is not None:
            rate = self.edit_usd_per_image
            return images * rate, f"{images} x ${_fmt(rate)}/image (edit)"
        mp = self.billed_mp(job.megapixels)
        extra = max(Decimal(0), mp - 1)
        per_image = self.first_mp_usd + extra * self.extra_mp_usd
        total = images * per_image
        text = f"{images} x (${_fmt(self.first_mp_usd)} first MP + {_fmt(extra)} MP x ${_fmt(self.extra_mp_usd)})"
        if job.kind is JobKind.EDIT and self.edit_input_mp_per_reference is not None:
            k = len(job.references)
            in_mp = self.billed_mp(self.edit_input_mp_per_reference)
            total += k * in_mp * self.extra_mp_usd
            text += f" + {k} x {_fmt(in_mp)} MP input x ${_fmt(self.extra_mp_usd)}"
        return total, text


class PerImage(_Sheet):
    """A flat price per returned image, any size (EmpirioLabs, docs/providers/empiriolabs.md#price)."""

    basis: Literal["per_image"]
    usd_per_image: NonNegative
    edit_usd_per_image: NonNegative | None = None  # defaults to usd_per_image

    def cost(self, job: ImageJob, images: int, live: Decimal | None) -> tuple[Decimal, str]:
        rate = self.usd_per_image
        if job.kind is JobKind.EDIT and self.edit_usd_per_image is not None:
            rate = self.edit_usd_per_image
        return images * rate, f"{images} x ${_fmt(rate)}/image"


class GpuTime(_Sheet):
    """The local GPU: what its time costs (docs/local-backend.md#cost-per-image).

    Per image = gpu_usd_per_hour / 3600 x seconds_per_image x (MP / reference_mp)
    x (steps / reference_steps), divided by `utilisation` when `amortized`.
    `reference_mp` 1 reads "0.57 s per image at 1 MP" (docs/providers/local.md#price) literally:
    1024x1024 costs 2.50/3600 x 0.57 x 1.048576 = $0.00041506, its worked
    example; set 1.048576 to follow the 1024x1024 measurement instead (5% less).
    A live figure from the backend replaces the sheet's per-image figure; it is
    read as one image at the reference conditions, in the sheet's mode, and
    scaled the same way.
    """

    basis: Literal["gpu_time"]
    gpu_usd_per_hour: NonNegative
    seconds_per_image: Positive
    reference_mp: Positive = Decimal(1)
    reference_steps: int = Field(default=4, gt=0)
    mode: Literal["marginal", "amortized"] = "marginal"
    utilisation: Annotated[Decimal, Field(gt=0, le=1)] = Decimal(1)

    @field_validator("mode", mode="before")
    @classmethod
    def _british_spelling(cls, value: Any) -> Any:
        return "amortized" if value == "amortised" else value

    def reference_usd_per_image(self) -> Decimal:
        per_image = self.gpu_usd_per_hour / SECONDS_PER_HOUR * self.seconds_per_image
        return per_image / self.utilisation if self.mode == "amortized" else per_image

    def cost(self, job: ImageJob, images: int, live: Decimal | None) -> tuple[Decimal, str]:
        scale = (job.megapixels / self.reference_mp) * (Decimal(job.steps) / self.reference_steps)
        if live is not None:
            base, how = live, f"live ${_fmt(live)}/image"
        else:
            base = self.reference_usd_per_image()
            how = f"${_fmt(self.gpu_usd_per_hour)}/h x {_fmt(self.seconds_per_image)} s"
            if self.mode == "amortized":
                how += f" / {_fmt(self.utilisation)} utilisation"
        text = f"{images} x {how} x ({_fmt(job.megapixels)} MP / {_fmt(self.reference_mp)} MP) x ({job.steps} / {self.reference_steps} steps) [{self.mode}]"
        return images * base * scale, text


PriceSheet = Annotated[
    PerMegapixel | TieredMegapixel | PerImage | GpuTime,
    Field(discriminator="basis"),
]
_SHEET = TypeAdapter(PriceSheet)
BASES = ("per_megapixel", "tiered_megapixel", "per_image", "gpu_time")


# Sheets are immutable and a cost depends only on the fields below, so a figure
# worked out once (Decimal arithmetic and the breakdown's text: about 10 us a
# backend, for every candidate of every request) is kept. Keyed by the sheet's
# identity, which the entry holds, so a reloaded sheet never meets an old figure;
# emptied when full, since sizes are the caller's to choose.
_COSTS: dict[tuple[Any, ...], tuple[PriceSheet, Any]] = {}
_COSTS_MAX = 4096


def cost_key(job: ImageJob) -> tuple[Any, ...]:
    """Everything of `job` that any sheet's `cost()` reads (with the image count and live figure beside it)."""
    return (job.kind, job.width, job.height, len(job.references), job.steps)


def _remembered(sheet: PriceSheet, key: tuple[Any, ...]) -> Any:
    hit = _COSTS.get(key)
    return hit[1] if hit is not None and hit[0] is sheet else None


def _remember(sheet: PriceSheet, key: tuple[Any, ...], value: Any) -> None:
    if len(_COSTS) >= _COSTS_MAX:
        _COSTS.clear()
    _COSTS[key] = (sheet, value)


def quote(sheet: PriceSheet, job: ImageJob, live_usd_per_image: Decimal | None = None) -> Quote:
    """What `job` will cost on this backend, for all `job.n` images."""
    live = _live(sheet, live_usd_per_image)
    key = ("quote", id(sheet), cost_key(job), job.n, live)
    found = _remembered(sheet, key)
    if found is None:
        total, breakdown = sheet.cost(job, job.n, live)
        found = Quote(usd(total), sheet.basis, breakdown)
        _remember(sheet, key, found)
    return found  # type: ignore[no-any-return]


def bill(sheet: PriceSheet, job: ImageJob, images_returned: int, live_usd_per_image: Decimal | None = None) -> Decimal:
    """What the request really cost when the provider returned `images_returned`
    images; 0 images (a failed, unbilled attempt) costs nothing."""
    if images_returned < 0:
        raise ValueError("images_returned must be >= 0")
    if images_returned == 0:
        return usd(Decimal(0))
    live = _live(sheet, live_usd_per_image)
    key = ("bill", id(sheet), cost_key(job), images_returned, live)
    found = _remembered(sheet, key)
    if found is None:
        total, _ = sheet.cost(job, images_returned, live)
        found = usd(total)
        _remember(sheet, key, found)
    return found  # type: ignore[no-any-return]


def _live(sheet: PriceSheet, live: Decimal | None) -> Decimal | None:
    # Only the GPU backend reports a live figure; a negative one is nonsense.
    return live if isinstance(sheet, GpuTime) and live is not None and live >= 0 else None


def parse_sheet(data: Any, origin: str = "<price sheet>") -> PriceSheet:
    """Validate one sheet's mapping; errors name `origin`, the field and the problem."""
    if not isinstance(data, dict):
        kind = "nothing" if data is None else type(data).__name__
        raise PriceSheetError(f"{origin}: (top level): expected a mapping of price-sheet fields, got {kind}")
    try:
        return _SHEET.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, data) for err in exc.errors())
        raise PriceSheetError(f"{origin}: {problems}") from None


def _describe(err: Any, data: dict[str, Any]) -> str:
    loc = list(err["loc"])
    if err["type"] == "union_tag_not_found":
        return f"basis: Field required (one of {', '.join(BASES)})"
    if err["type"] == "union_tag_invalid":
        return f"basis: unknown basis {data.get('basis')!r} (expected one of {', '.join(BASES)})"
    if loc and loc[0] == data.get("basis"):
        loc = loc[1:]  # drop the discriminator tag pydantic puts first
    field = ".".join(str(part) for part in loc) or "(top level)"
    return f"{field}: {err['msg']}"


def load_sheet(path: str | Path) -> PriceSheet:
    """Read and validate one YAML price sheet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceSheetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(top level)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise PriceSheetError(f"{path}: {where}: invalid YAML: {problem}") from None
    return parse_sheet(data, str(path))


def load_sheets(directory: str | Path) -> dict[str, PriceSheet]:
    """Every `*.yaml`/`*.yml` sheet in `directory`, keyed by its `backend`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PriceSheetError(f"{directory}: not a directory of price sheets")
    found: dict[str, tuple[PriceSheet, Path]] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        sheet = load_sheet(path)
        if sheet.backend in found:
            first = found[sheet.backend][1]
            raise PriceSheetError(f"{path}: backend: {sheet.backend!r} is already priced by {first}")
        found[sheet.backend] = (sheet, path)
    return {name: sheet for name, (sheet, _) in found.items()}
