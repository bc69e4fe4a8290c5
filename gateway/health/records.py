"""How backend health is laid out in a StateStore, and read back in few round trips.

Per backend `<name>`, under `health:<name>:`:
  breaker            BreakerRecord as JSON (compare-and-set on every transition)
  park               Retry-After parking: the clock instant it ends
  creds              present while the credentials are known to be rejected
  consec             failures in a row (reset by a success or a transition)
  probe_fails        failed probes in a row
  w:<gen>:<i>:ok|fail  sliding-window counters, one pair per bucket; a
                     close bumps <gen>, so a recovered backend starts a fresh window
  lat                newest latency samples (bounded list)
  live, last_error, last_probe   JSON documents
  trial:<version>:<slot>  a half-open trial lease (SET NX); <version> names
                     the breaker record it belongs to, so leases never outlive it

Instants are on the tracker's clock (wall time, so replicas agree); TTLs are
only for garbage collection and are always longer than the meaning they carry.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.health.breaker import BreakerRecord, Window
from gateway.redaction import redact
from gateway.state.base import StateStore

WINDOW_BUCKETS = 10
RECORD_TTL_S = 86_400.0
NOTE_TTL_S = 3_600.0


@dataclass(slots=True)
class Snapshot:
    """Everything known about one backend, read at one moment."""

    raw_record: str | None = None
    record: BreakerRecord = field(default_factory=BreakerRecord)
    parked_until: float = 0.0
    credentials_invalid: bool = False
    failures_in_row: int = 0
    probe_failures_in_row: int = 0
    window: Window = field(default_factory=Window)
    latencies: list[float] = field(default_factory=list)
    live: dict[str, Any] = field(default_factory=dict)
    last_error: dict[str, Any] | None = None
    last_probe: dict[str, Any] | None = None


def key(name: str, *parts: object) -> str:
    return ":".join(("health", name, *map(str, parts)))


def bucket_of(now: float, window_s: float) -> int:
    return math.floor(now / (window_s / WINDOW_BUCKETS))


def window_key(name: str, gen: int, bucket: int, outcome: str) -> str:
    return key(name, "w", gen, bucket, outcome)


def window_ttl(window_s: float) -> float:
    return window_s * (1 + 2 / WINDOW_BUCKETS) + 5


def window_keys(name: str, gen: int, now: float, window_s: float) -> list[str]:
    """The ok/fail keys of the buckets that cover the last `window_s` (the
    current bucket included, so the window spans 0.9 to 1.0 of window_s)."""
    last = bucket_of(now, window_s)
    return [window_key(name, gen, b, o) for b in range(last - WINDOW_BUCKETS + 1, last + 1) for o in ("ok", "fail")]


def as_int(raw: str | None) -> int:
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def as_float(raw: object) -> float:
    try:
        return float(raw) if isinstance(raw, (str, bytes, int, float)) else 0.0
    except (TypeError, ValueError):
        return 0.0


def as_doc(raw: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


_SCALARS = ("breaker", "park", "creds", "consec", "probe_fails", "live", "last_error", "last_probe")


async def read_window(store: StateStore, name: str, gen: int, now: float, window_s: float) -> Window:
    values = await store.get_many(window_keys(name, gen, now, window_s))
    return Window(ok=sum(as_int(v) for v in values[0::2]), failed=sum(as_int(v) for v in values[1::2]))


async def read_snapshots(store: StateStore, names: Sequence[str], now: float, window_s: Mapping[str, float], *, full: bool = True) -> dict[str, Snapshot]:
    """Snapshots in three round trips whatever the number of backends.
    `full=False` skips the window and latency samples (enough for `acquire`)."""
    names = list(names)
    raw = await store.get_many([key(n, s) for n in names for s in _SCALARS])
    snaps: dict[str, Snapshot] = {}
    for i, name in enumerate(names):
        v = dict(zip(_SCALARS, raw[i * len(_SCALARS) : (i + 1) * len(_SCALARS)], strict=True))
        snaps[name] = Snapshot(
            raw_record=v["breaker"],
            record=BreakerRecord.decode(v["breaker"]),
            parked_until=as_float(v["park"]),
            credentials_invalid=v["creds"] is not None,
            failures_in_row=as_int(v["consec"]),
            probe_failures_in_row=as_int(v["probe_fails"]),
            live=as_doc(v["live"]) or {},
            last_error=as_doc(v["last_error"]),
            last_probe=as_doc(v["last_probe"]),
        )
    if not full or not names:
        return snaps
    keys = [window_keys(n, snaps[n].record.gen, now, window_s[n]) for n in names]
    counts = await store.get_many([k for ks in keys for k in ks])
    latencies = await asyncio.gather(*(store.samples(key(n, "lat")) for n in names))
    per = 2 * WINDOW_BUCKETS
    for i, name in enumerate(names):
        mine = counts[i * per : (i + 1) * per]
        snaps[name].window = Window(ok=sum(as_int(c) for c in mine[0::2]), failed=sum(as_int(c) for c in mine[1::2]))
        snaps[name].latencies = latencies[i]
    return snaps


def quantile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_SECRET = re.compile(
    r"\b(authorization|bearer|token|api[_-]?key|key|password|secret)\b\s*[:=]?\s*(?:(?:bearer|key|token|basic)\s+)?\S+",
    re.IGNORECASE,
)


def sanitise(text: str, limit: int = 200) -> str:
    """A message safe for /v1/backends: no URLs, nothing that looks like a
    credential, no registered secret in any spelling `redact` knows."""
    text = _URL.sub("<url>", redact(text or ""))
    text = _SECRET.sub(lambda m: f"{m.group(1)} <redacted>", text)
    return " ".join(text.split())[:limit]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def live_figures(live: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers a probe reported; one nested level (the local
    backend's `cost: {marginal_usd_per_image: ...}`) is flattened."""
    out: dict[str, float] = {}
    for field_name, value in live.items():
        items = value.items() if isinstance(value, Mapping) else [(field_name, value)]
        for k, v in items:
            if (number := _number(v)) is not None:
                out[str(k)] = number
    return out


def as_decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value)) if _number(value) is not None else None
    except InvalidOperation:
        return None


# ---- merging what a replica learned alone back into the shared store -------

_BREAKER_KEY = re.compile(r"^health:[^:]+:breaker$")
_PARK_KEY = re.compile(r"^health:[^:]+:park$")
_NOTE_KEY = re.compile(r"^health:[^:]+:(last_error|last_probe|live)$")


def merge_pushed_back(key: str, mine: str, theirs: str | None) -> str | None:
    """What to write back for `key` after an outage: `mine` is what this
    replica wrote while the shared store was away, `theirs` what the store
    holds now (often an older record that outlived the outage). None keeps
    theirs.

    - breaker: the record whose state changed last wins (`since`, then
      `version`): versions of records written apart are not comparable, the
      instant of the latest transition is. A winning local record is written
      with a version above both, so every reader sees a new record.
    - park: the later deadline.
    - last_error, last_probe, live: the later note (`at`).
    - anything else: set only where absent (never overwrite another replica).
    """
    if theirs is None:
        return mine
    if _BREAKER_KEY.match(key):
        local, shared = BreakerRecord.decode(mine), BreakerRecord.decode(theirs)
        if (local.since, local.version) <= (shared.since, shared.version):
            return None
        return replace(local, version=max(local.version, shared.version) + 1).encode()
    if _PARK_KEY.match(key):
        return mine if as_float(mine) > as_float(theirs) else None
    if _NOTE_KEY.match(key):
        return mine if as_float((as_doc(mine) or {}).get("at")) > as_float((as_doc(theirs) or {}).get("at")) else None
    return None
