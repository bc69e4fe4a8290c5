"""`GET /v1/usage`: spend, images, megapixels and requests from the usage ledger.

Query: `start`, `end` (ISO-8601 dates or times, or Unix seconds; default the
last 30 days), `group_by` (comma-separated: key, backend, day, route,
status; default `key,backend,day`). A key sees its own usage; an admin key
(`admin: true` in the keys file), or anyone on an open gateway, sees all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, get

from gateway.domain.errors import InvalidRequest
from gateway.http.entry import begin, gateway_of
from gateway.money.ledger import GROUPS, summarise

DEFAULT_SPAN = timedelta(days=30)


def parse_time(value: str, param: str) -> datetime:
    """ISO-8601 (a date means its midnight UTC) or Unix seconds; naive times are UTC."""
    text = value.strip()
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), UTC)
        parsed = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise InvalidRequest(f"{param} must be an ISO-8601 date or time, or Unix seconds", param=param, code="invalid_value") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)  # an offset at the calendar's ends can fall outside it in UTC
    except OverflowError:
        raise InvalidRequest(f"{param} is outside 0001-01-01 to 9999-12-31 once moved to UTC", param=param, code="invalid_value") from None


def span_before(until: datetime) -> datetime:
    """The default start, DEFAULT_SPAN before `until`, or the calendar's first day when that is nearer."""
    earliest = datetime.min.replace(tzinfo=UTC)
    return until - DEFAULT_SPAN if until - earliest > DEFAULT_SPAN else earliest


def parse_group_by(value: str | None) -> list[str]:
    groups = [g.strip() for g in (value or "key,backend,day").split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or len(set(groups)) != len(groups):
        raise InvalidRequest(f"group_by takes distinct names from: {', '.join(GROUPS)}", param="group_by", code="invalid_value")
    return groups


def report(rows: list[Any], groups: list[str], start: datetime, end: datetime) -> dict[str, Any]:
    total = summarise(rows, [])
    empty = {"requests": 0, "images": 0, "megapixels": "0", "cost_usd": "0", "billed_usd": None}
    return {
        "object": "usage",
        "start": start.isoformat(),
        "end": end.isoformat(),
        "group_by": groups,
        "data": summarise(rows, groups),
        "total": total[0] if total else empty,
    }


@get("/v1/usage")
async def usage(request: Request[Any, Any, Any], start: str | None = None, end: str | None = None, group_by: str | None = None) -> Response[bytes]:
    gw = gateway_of(request)
    ctx = begin(request, gw)
    now = datetime.now(UTC)
    until = parse_time(end, "end") if end else now
    since = parse_time(start, "start") if start else span_before(until)
    if since >= until:
        raise InvalidRequest("start must be before end", param="start", code="invalid_value")
    groups = parse_group_by(group_by)
    everyone = ctx.key is None or ctx.key.admin
    rows = await gw.billing.ledger.query(since, until, None if everyone else ctx.key.name)  # type: ignore[union-attr]
    return Response(msgspec.json.encode(report(rows, groups, since, until)), media_type=MediaType.JSON, headers={"x-request-id": ctx.request_id})


ROUTES = [usage]
