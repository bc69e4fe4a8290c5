"""Backend health: what a failure means for a backend, and the shared breakers.

- `health_effect`: the pure policy table from a classified failure to its
  effect (count against health, park for Retry-After, mark credentials).
- `HealthTracker`: the one object dispatch, routing, probes and the
  /v1/backends view talk to. It keeps breakers (gateway/state/breaker.py),
  window counts, latency samples, parking, credentials marks and live
  figures in a `StateStore`, so every replica reads what any replica learned
  (immediately with Redis: nothing is cached between calls).

Instants are on a wall clock (`time.time` by default) because replicas on
different hosts share them; a monotonic clock is only meaningful within one
process. Any failure of the store is logged and absorbed here: health
bookkeeping never fails a request (views fall back to healthy, `acquire` to
yes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.healthview import HEALTHY, BreakerState, HealthView
from gateway.providers import adapter_class
from gateway.providers.base import DELIVERY_NETWORK, GATEWAY_OVERLOADED, FailureClass, ProbeResult, ProviderError
from gateway.state import health_records as hr
from gateway.state.base import StateStore
from gateway.state.breaker import BreakerPolicy, BreakerRecord, after_failure, after_probe, after_success
from gateway.state.trials import Lease, TrialLeases

__all__ = ["Admission", "BreakerPolicy", "HealthEffect", "HealthTracker", "health_effect"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthEffect:
    counts_as_failure: bool
    park_s: float | None
    mark_credentials_invalid: bool


NO_EFFECT = HealthEffect(False, None, False)
COUNTS = HealthEffect(True, None, False)


def health_effect(
    error: ProviderError,
    *,
    reports_queue_wait: bool = False,
    default_park_s: float = 5.0,
    out_of_credit_park_s: float = 300.0,
) -> HealthEffect:
    """What one classified failure does to its backend's health (docs/design.md#failure-classes).

    - REJECTED, CONTENT_FILTERED: the input or the picture, not the backend.
    - UNREACHABLE, FAILED, UNKNOWN_OUTCOME: count against health.
    - REFUSED 429: back-pressure, not sickness: park for Retry-After (or
      `default_park_s`), do not count. From a backend that reports a queue
      wait (`Adapter.reports_queue_wait`: the local GPU) a 429 only means its
      queue is full for this request; the router already routes on that live
      wait, so it neither parks nor counts.
    - REFUSED 503: parks and counts (the service says it is unavailable).
    - REFUSED 402 (out of credit): parks for `out_of_credit_park_s` at least,
      and counts; credit rarely returns within seconds.
    - REFUSED 401/403: the credentials are rejected; the backend is down until
      a good probe clears the mark. Not counted: it is configuration, not
      sickness, and counting would keep the breaker open after the fix.
    - REFUSED otherwise (a provider's own refusal code): treated as 503.
    - A timeout that fired long after it was due (code `gateway_overloaded`):
      the gateway's own event loop was too busy, not the backend; no effect.
    - DELIVERY_FAILED: the images came back wrong (wrong size, broken, too
      few): counts. One the gateway could not download in transport (code
      `delivery_network`) may be the gateway's own network: no effect.
    """
    failure = error.failure
    if failure in (FailureClass.REJECTED, FailureClass.CONTENT_FILTERED) or error.code in (GATEWAY_OVERLOADED, DELIVERY_NETWORK):
        return NO_EFFECT
    if failure is not FailureClass.REFUSED:
        return COUNTS
    if error.credentials_invalid or error.status in (401, 403):
        return HealthEffect(False, None, True)
    retry_after = error.retry_after if error.retry_after is not None else default_park_s
    park = retry_after if retry_after > 0 else None
    if error.status == 429:
        return NO_EFFECT if reports_queue_wait else HealthEffect(False, park, False)
    if error.status == 402:
        return HealthEffect(True, max(out_of_credit_park_s, error.retry_after or 0.0), False)
    return HealthEffect(True, park, False)


def _reports_queue_wait(kind: str) -> bool:
    try:
        return adapter_class(kind).reports_queue_wait
    except LookupError:  # an adapter outside the registry (a test's stand-in) reports none
        return False


# ---- the tracker ------------------------------------------------------------


@dataclass(slots=True)
class Admission:
    """One request let through to one backend; holds its half-open trial
    lease, if it took one. Hand it back with the outcome (or to `release`)."""

    name: str
    lease: Lease | None = None


StateCallback = Callable[[str, BreakerState], None]
_CAS_TRIES = 4
_COST_KEYS = ("live_usd_per_image", "usd_per_image", "marginal_usd_per_image")


class HealthTracker:
    """Breakers, statistics, parking and live figures for every backend.

    `policies` and `kinds` are keyed by backend name (a name without a
    policy gets `default_policy`). Live figures older than `live_ttl_s` are
    ignored, so a stalled prober does not leave a stale queue wait behind.
    """

    def __init__(
        self,
        store: StateStore,
        policies: Mapping[str, BreakerPolicy],
        kinds: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.time,
        default_policy: BreakerPolicy | None = None,
        live_ttl_s: float = 120.0,
        view_ttl_s: float = 0.1,
    ) -> None:
        self.store = store
        # Routing reads every backend's view on every request; re-reading the store's
        # records at most every `view_ttl_s` keeps that off the hot path. What this replica
        # records itself invalidates the cache at once, and `acquire` always reads
        # fresh, so a stale view can only order candidates, never admit an open one.
        self.view_ttl_s = view_ttl_s
        self._views_cache: tuple[float, tuple[str, ...], dict[str, hr.Snapshot]] | None = None
        self._policies = dict(policies)
        self._queue_wait = {name: _reports_queue_wait(kind) for name, kind in kinds.items()}
        self._default = default_policy or BreakerPolicy()
        self._clock = clock
        self.live_ttl_s = live_ttl_s
        self._callbacks: list[StateCallback] = []
        self._seen: dict[str, BreakerState] = {}
        self._trials = TrialLeases(store)

    def policy(self, name: str) -> BreakerPolicy:
        return self._policies.get(name, self._default)

    def on_state_change(self, callback: StateCallback) -> None:
        """`callback(name, state)` whenever this replica sees a backend's
        breaker state change (its own transitions and ones read from the store)."""
        self._callbacks.append(callback)

    # ---- reading -----------------------------------------------------------

    async def views(self, names: Iterable[str]) -> dict[str, HealthView]:
        names = list(dict.fromkeys(names))
        now = self._clock()
        cached = self._views_cache
        if cached is not None and cached[1] == tuple(names) and 0 <= now - cached[0] < self.view_ttl_s:
            snaps = cached[2]
        else:
            try:
                snaps = await self._snapshots(names, now)
            except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
                self._absorb("views", exc)
                return {n: HEALTHY for n in names}
            self._views_cache = (now, tuple(names), snaps)
        # Views are derived at `now` even from cached records, so cooldowns and
        # parking end on time.
        return {n: self._view(n, snaps[n], now) for n in names}

    async def describe(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each backend's health as JSON-able data, for GET /v1/backends."""
        names = list(dict.fromkeys(names))
        now = self._clock()
        try:
            snaps = await self._snapshots(names, now)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("describe", exc)
            return {n: {"state": "unknown", "why_unavailable": "health state unreadable"} for n in names}
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            snap, view, policy = snaps[name], self._view(name, snaps[name], now), self.policy(name)
            out[name] = {
                "state": view.state.value,
                "available": view.available,
                "why_unavailable": view.why_unavailable,
                "parked_for_s": round(view.parked_for_s, 3),
                "credentials_invalid": view.credentials_invalid,
                "cooldown_s": snap.record.cooldown_s,  # of the latest opening
                "cooldown_left_s": round(snap.record.cooldown_left(now), 3),
                "error_rate": round(view.error_rate, 4),
                "window": {"seconds": policy.window_s, "requests": snap.window.total, "failures": snap.window.failed},
                "failures_in_row": snap.failures_in_row,
                "latency_p50_s": view.latency_p50_s,
                "latency_p95_s": view.latency_p95_s,
                "latency_samples": len(snap.latencies),
                "estimated_wait_s": view.estimated_wait_s,
                "live_usd_per_image": None if view.live_usd_per_image is None else str(view.live_usd_per_image),
                "live": self._fresh_live(snap.live, now),
                "last_error": snap.last_error,
                "last_probe": snap.last_probe,
            }
        return out

    # ---- gating ------------------------------------------------------------

    async def acquire(self, name: str) -> Admission | None:
        """May a request go to `name` now? None while open, parked or with
        rejected credentials; while half-open, an admission for at most
        `half_open_max_trials` callers across all replicas (a SET NX lease
        with the request's own token). A store that cannot be read admits
        (health never fails a request); a lease that cannot be taken does
        not (a half-open backend gets one trial, not one per store error)."""
        now, policy = self._clock(), self.policy(name)
        try:
            snap = (await hr.read_snapshots(self.store, [name], now, {name: policy.window_s}, full=False))[name]
            state = snap.record.effective(now)
            self._observe(name, state)
            if snap.credentials_invalid or snap.parked_until > now or state is BreakerState.OPEN:
                return None
            if state is BreakerState.CLOSED:
                return Admission(name)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("acquire", exc)
            return Admission(name)
        try:
            lease = await self._trials.take(name, snap.record, now, policy)
        except Exception as exc:  # noqa: BLE001 - half-open and no lease in hand: not a trial
            self._absorb("trial lease", exc)
            return None
        return Admission(name, lease) if lease is not None else None

    async def release(self, admission: Admission | None) -> None:
        """Give back the admission's trial lease, if it holds one and has not
        given it back yet. Safe to call more than once: dispatch calls it in a
        `finally`, so a request cancelled half way never keeps a slot."""
        if admission is None or admission.lease is None:
            return
        try:
            await self._trials.give_back(admission.lease)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("release", exc)

    # ---- recording ---------------------------------------------------------

    async def record_success(self, name: str, latency_s: float, admission: Admission | None = None) -> None:
        """A good answer; gives back `admission`'s trial lease (only that one)."""
        self._views_cache = None
        now, policy = self._clock(), self.policy(name)
        try:
            raw = await self.store.get(hr.key(name, "breaker"))
            await self._count(name, BreakerRecord.decode(raw), now, policy, "ok")
            await self.store.set(hr.key(name, "consec"), "0", ttl_s=hr.NOTE_TTL_S)
            await self._sample(name, latency_s, policy)

            async def decide(record: BreakerRecord) -> BreakerRecord | None:
                return after_success(record, now)

            await self._transition(name, raw, decide)
            await self.release(admission)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("record_success", exc)

    async def record_failure(self, name: str, error: ProviderError, latency_s: float | None = None, admission: Admission | None = None) -> None:
        """Apply `health_effect`. A timeout's latency joins the samples (a lower
        bound that keeps p95 honest); other failures' latencies do not.
        Gives back `admission`'s trial lease, never another request's."""
        self._views_cache = None
        now, policy = self._clock(), self.policy(name)
        effect = health_effect(
            error,
            reports_queue_wait=self._queue_wait.get(name, False),
            default_park_s=policy.default_park_s,
            out_of_credit_park_s=policy.out_of_credit_park_s,
        )
        try:
            note = {"class": str(error.failure), "status": error.status, "message": hr.sanitise(error.message), "at": now}
            await self.store.set(hr.key(name, "last_error"), json.dumps(note), ttl_s=hr.NOTE_TTL_S)
            if effect.park_s:
                await self._park(name, now + effect.park_s, effect.park_s)
            if effect.mark_credentials_invalid:
                await self.store.set(hr.key(name, "creds"), repr(now), ttl_s=policy.credentials_recheck_s)
            if not effect.counts_as_failure:
                await self.release(admission)
                return
            raw = await self.store.get(hr.key(name, "breaker"))
            await self._count(name, BreakerRecord.decode(raw), now, policy, "fail")
            in_row = await self.store.incr(hr.key(name, "consec"), ttl_s=hr.NOTE_TTL_S)
            if latency_s is not None and error.failure is FailureClass.UNKNOWN_OUTCOME:
                await self._sample(name, latency_s, policy)

            async def decide(record: BreakerRecord) -> BreakerRecord | None:
                window = await hr.read_window(self.store, name, record.gen, now, policy.window_s)
                return after_failure(record, now, policy, window, in_row)

            await self._transition(name, raw, decide)
            await self.release(admission)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("record_failure", exc)

    async def record_probe(self, name: str, result: ProbeResult) -> None:
        """Store the probe and its live figures; a good probe clears a
        credentials mark and a probe whose key was refused sets one.
        Breaker effects: see `after_probe`."""
        self._views_cache = None
        now, policy = self._clock(), self.policy(name)
        try:
            note = {"ok": result.ok, "detail": hr.sanitise(result.detail), "latency_s": result.latency_s, "at": now}
            await self.store.set(hr.key(name, "last_probe"), json.dumps(note), ttl_s=hr.NOTE_TTL_S)
            if figures := hr.live_figures(result.live):
                doc = json.dumps({"at": now, "figures": figures})
                await self.store.set(hr.key(name, "live"), doc, ttl_s=self.live_ttl_s)
            if result.credentials_invalid:  # a probe is as good a witness of a revoked key as a request
                await self.store.set(hr.key(name, "creds"), repr(now), ttl_s=policy.credentials_recheck_s)
            if result.ok:
                await self.store.delete(hr.key(name, "creds"))
                await self.store.set(hr.key(name, "probe_fails"), "0", ttl_s=hr.NOTE_TTL_S)
                in_row = 0
            else:
                in_row = await self.store.incr(hr.key(name, "probe_fails"), ttl_s=hr.NOTE_TTL_S)
            raw = await self.store.get(hr.key(name, "breaker"))

            async def decide(record: BreakerRecord) -> BreakerRecord | None:
                return after_probe(record, now, policy, result.ok, in_row)

            await self._transition(name, raw, decide)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("record_probe", exc)

    # ---- internals ---------------------------------------------------------

    async def _count(self, name: str, record: BreakerRecord, now: float, policy: BreakerPolicy, outcome: str) -> None:
        key = hr.window_key(name, record.gen, hr.bucket_of(now, policy.window_s), outcome)
        await self.store.incr(key, ttl_s=hr.window_ttl(policy.window_s))

    async def _sample(self, name: str, latency_s: float, policy: BreakerPolicy) -> None:
        ttl = max(policy.window_s * 10, 600.0)
        await self.store.append_sample(hr.key(name, "lat"), latency_s, keep=policy.latency_samples, ttl_s=ttl)

    async def _park(self, name: str, until: float, park_s: float) -> None:
        """Park until `until`, never shortening a longer parking already set."""
        key = hr.key(name, "park")
        current = await self.store.get(key)
        if current is None or hr.as_float(current) < until:
            await self.store.set(key, repr(until), ttl_s=park_s + 60.0)

    async def _transition(self, name: str, raw: str | None, decide: Callable[[BreakerRecord], Any]) -> None:
        """Compare-and-set the breaker; on a lost race re-read and decide again."""
        key = hr.key(name, "breaker")
        for _ in range(_CAS_TRIES):
            record = BreakerRecord.decode(raw)
            new = await decide(record)
            if new is None:
                return
            if await self.store.compare_and_set(key, raw, new.encode(), ttl_s=hr.RECORD_TTL_S):
                await self.store.set(hr.key(name, "consec"), "0", ttl_s=hr.NOTE_TTL_S)
                await self.store.set(hr.key(name, "probe_fails"), "0", ttl_s=hr.NOTE_TTL_S)
                log.info("breaker %s: %s -> %s (cooldown %.1fs)", name, record.effective(new.since), new.state, new.cooldown_s)
                self._observe(name, new.state)
                return
            raw = await self.store.get(key)

    async def _snapshots(self, names: list[str], now: float) -> dict[str, hr.Snapshot]:
        return await hr.read_snapshots(self.store, names, now, {n: self.policy(n).window_s for n in names})

    def _view(self, name: str, snap: hr.Snapshot, now: float) -> HealthView:
        state = snap.record.effective(now)
        self._observe(name, state)
        live = self._fresh_live(snap.live, now)
        cost = next((live[k] for k in _COST_KEYS if k in live), None)
        return HealthView(
            state=state,
            parked_for_s=max(0.0, snap.parked_until - now),
            credentials_invalid=snap.credentials_invalid,
            latency_p50_s=hr.quantile(snap.latencies, 0.5),
            latency_p95_s=hr.quantile(snap.latencies, 0.95),
            error_rate=snap.window.error_rate,
            estimated_wait_s=live.get("estimated_wait_s"),
            live_usd_per_image=hr.as_decimal(cost),
        )

    def _fresh_live(self, doc: Mapping[str, Any], now: float) -> dict[str, float]:
        figures = doc.get("figures")
        if not isinstance(figures, dict) or now - hr.as_float(doc.get("at")) > self.live_ttl_s:
            return {}
        return hr.live_figures(figures)

    def _observe(self, name: str, state: BreakerState) -> None:
        if self._seen.get(name) is state:
            return
        self._seen[name] = state
        for callback in self._callbacks:
            try:
                callback(name, state)
            except Exception:  # a metrics hook must not break health bookkeeping
                log.exception("breaker state callback failed")

    @staticmethod
    def _absorb(what: str, exc: BaseException) -> None:
        log.warning("health %s skipped: state store error %s", what, type(exc).__name__)
