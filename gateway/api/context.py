"""Per-request facts every handler needs: request id, caller, deadline, body."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request

from gateway.errors import AuthenticationFailed, InvalidRequest, UnsupportedMediaType
from gateway.job import new_request_id
from gateway.keys import Caller, KeyRing, anonymous_name

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    caller: str | None  # the key's name from the keys file, or a short stable id; never the key
    deadline_s: float
    key: Caller | None = None  # the key's rules (budgets, limits, backends), where it has any


def key_id(key: str) -> str:
    """A stable, non-reversible label for a caller key (for metrics and logs)."""
    return anonymous_name(key)


def authenticate(request: Request[Any, Any, Any], keys: KeyRing) -> Caller | None:
    """The caller, or None when the gateway is open (no keys configured).

    The bearer token is looked up by its SHA-256 (the keys file holds only
    that), among `KLEIN_GATEWAY_KEYS` and the `KLEIN_KEYS_FILE` keys."""
    if keys.open:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    caller = keys.lookup(token) if scheme.lower() == "bearer" and token else None
    if caller is None:
        raise AuthenticationFailed("missing or invalid API key: send Authorization: Bearer <key>")
    return caller


def request_id_for(request: Request[Any, Any, Any]) -> str:
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID.match(given) else new_request_id()


def deadline_for(request: Request[Any, Any, Any], default_s: float, max_s: float) -> float:
    raw = request.headers.get("x-klein-deadline-ms")
    if raw is None:
        return default_s
    try:
        ms = int(raw)
    except ValueError:
        raise InvalidRequest("x-klein-deadline-ms must be an integer number of milliseconds", param="x-klein-deadline-ms", code="invalid_deadline") from None
    if ms <= 0:
        raise InvalidRequest("x-klein-deadline-ms must be positive", param="x-klein-deadline-ms", code="invalid_deadline")
    return min(ms / 1000, max_s)


async def json_object(request: Request[Any, Any, Any]) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaType(f"send JSON (content-type application/json), not {ctype}")
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return body
