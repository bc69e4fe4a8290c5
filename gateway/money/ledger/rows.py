"""A usage row, and the pure arithmetic of usage reports over rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from gateway.routing.pricing import usd_text

GROUPS = ("key", "backend", "day", "route", "status")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One request (or async job), as the ledger keeps it."""

    at: datetime  # UTC
    request_id: str
    key_name: str
    route: str
    backend: str | None
    attempts: int
    images: int
    megapixels: Decimal
    estimated_usd: Decimal
    billed_usd: Decimal | None
    billed_source: str | None
    status: int
    row_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Which settle of `request_id` this is: 1 for a request, the run number for an
    # async job (a run stopped at a shutdown is settled, and so is its takeover).
    # None on rows written before the ledger kept it.
    run: int | None = 1


def _group_value(row: UsageRow, group: str) -> str | int | None:
    if group == "key":
        return row.key_name
    if group == "day":
        return row.at.strftime("%Y-%m-%d")
    return getattr(row, group)


def summarise(rows: Iterable[UsageRow], group_by: Sequence[str]) -> list[dict[str, object]]:
    """Spend, billed figure, images, megapixels and requests per group, in
    group order. Sums are Decimal; figures are text, as in the headers."""
    groups: dict[tuple[object, ...], dict[str, object]] = {}
    for row in rows:
        k = tuple(_group_value(row, g) for g in group_by)
        agg = groups.get(k)
        if agg is None:
            agg = groups[k] = {"requests": 0, "images": 0, "megapixels": Decimal(0), "cost_usd": Decimal(0), "billed_usd": Decimal(0), "billed_requests": 0}
        agg["requests"] += 1  # type: ignore[operator]
        agg["images"] += row.images  # type: ignore[operator]
        agg["megapixels"] += row.megapixels  # type: ignore[operator]
        agg["cost_usd"] += row.estimated_usd  # type: ignore[operator]
        if row.billed_usd is not None:
            agg["billed_usd"] += row.billed_usd  # type: ignore[operator]
            agg["billed_requests"] += 1  # type: ignore[operator]
    out = []
    for group in sorted(groups, key=lambda t: tuple("" if v is None else str(v) for v in t)):
        agg = groups[group]
        item: dict[str, object] = {g: v for g, v in zip(group_by, group, strict=True)}
        item.update(
            requests=agg["requests"],
            images=agg["images"],
            megapixels=f"{Decimal(agg['megapixels']).normalize():f}",  # type: ignore[arg-type]
            cost_usd=usd_text(agg["cost_usd"]),  # type: ignore[arg-type]
            billed_usd=usd_text(agg["billed_usd"]) if agg["billed_requests"] else None,  # type: ignore[arg-type]
        )
        out.append(item)
    return out
