"""Per-request facts every handler needs: request id, caller, deadline, body."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request

from gateway.domain.errors import AuthenticationFailed, InvalidRequest, UnsupportedMediaType
from gateway.domain.job import new_request_id
from gateway.money.keys import Caller, KeyRing

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Ten digits of milliseconds is over 100 days, far past any max deadline; a
# longer header is refused before it is parsed (int() of a huge string costs
# time and its float overflows).
MAX_DEADLINE_DIGITS = 10
# The shortest deadline accepted: less than this cannot cover even planning and
# one upstream round trip, so it could only end in a 504 after spend; refused first.
MIN_DEADLINE_MS = 100
_INTEGER = re.compile(r"^-?[0-9]+$")
# JSON nested deeper than this is refused: no field of the API nests past 3,
# and the decoder recurses, so a deep enough body would exhaust the stack.
MAX_JSON_DEPTH = 32


@dataclass(frozen=True, slots=True)
class CallContext:
    request_id: str
    caller: str | None  # the caller's label: its name in the keys file, else a keyed hash (gateway.domain.callers); never the key
    deadline_s: float
    key: Caller | None = None  # the key's rules (budgets, limits, backends), where it has any


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
    """The request's id: the caller's `x-request-id` when it is sane, else a new one.

    Fixed on first use and kept in the connection state, so the handler, the
    exception handlers and the response hook all name the same id."""
    state = request.scope.setdefault("state", {})
    known = state.get("request_id")
    if known:
        return known
    given = request.headers.get("x-request-id")
    request_id = given if given and _REQUEST_ID.match(given) else new_request_id()
    state["request_id"] = request_id
    return request_id


def deadline_for(request: Request[Any, Any, Any], default_s: float, max_s: float) -> float:
    raw = request.headers.get("x-klein-deadline-ms")
    if raw is None:
        return default_s
    raw = raw.strip()
    if not _INTEGER.match(raw):
        raise InvalidRequest("x-klein-deadline-ms must be an integer number of milliseconds", param="x-klein-deadline-ms", code="invalid_deadline")
    if len(raw.lstrip("-")) > MAX_DEADLINE_DIGITS:
        raise InvalidRequest(f"x-klein-deadline-ms must be at most {MAX_DEADLINE_DIGITS} digits; the gateway caps deadlines at {max_s:g} s", param="x-klein-deadline-ms", code="invalid_deadline")
    ms = int(raw)
    if ms <= 0:
        raise InvalidRequest("x-klein-deadline-ms must be positive", param="x-klein-deadline-ms", code="invalid_deadline")
    if ms < MIN_DEADLINE_MS:
        raise InvalidRequest(f"x-klein-deadline-ms must be at least {MIN_DEADLINE_MS}; no backend can answer sooner", param="x-klein-deadline-ms", code="invalid_deadline")
    return min(ms / 1000, max_s)


async def form_of(request: Request[Any, Any, Any]) -> Any:
    """The request's multipart or urlencoded form; text fields that are not UTF-8 are the caller's 400."""
    try:
        return await request.form()
    except UnicodeDecodeError:
        raise InvalidRequest("form fields must be UTF-8 text", code="invalid_encoding") from None


async def json_object(request: Request[Any, Any, Any]) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaType(f"send JSON (content-type application/json), not {ctype}")
    body = decode_json(await request.body())
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return body


def decode_json(raw: bytes | str, *, what: str = "request body", param: str | None = None) -> Any:
    """Decode JSON, refusing what is not JSON and what nests deeper than MAX_JSON_DEPTH."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise InvalidRequest(f"{what} is not valid JSON", param=param, code="invalid_json") from None
    except RecursionError:
        value = None
        too_deep = True
    else:
        too_deep = nesting_depth(value) > MAX_JSON_DEPTH
    if too_deep:
        raise InvalidRequest(f"{what} is nested too deeply; at most {MAX_JSON_DEPTH} levels", param=param, code="invalid_json")
    return value


def nesting_depth(value: Any) -> int:
    """How deep lists and objects nest in a decoded JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest
