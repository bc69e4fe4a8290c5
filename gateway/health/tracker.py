"""Backend health: what a failure means for a backend, and the shared breakers.

- `health_effect`: the pure policy table from a classified failure to its
  effect (count against health, park for Retry-After, mark credentials).
- `HealthTracker`: the one object dispatch, routing, probes and the
  /v1/backends view talk to. It keeps breakers (gateway/health/breaker.py),
  window counts, latency samples, parking, credentials marks and live
  figures in a `StateStore`, so every replica reads what any replica learned.
  Routing and the closed-breaker case of `acquire` read this process's copy
  (gateway/health/snapshot.py: refreshed every 250 ms, breaker transitions
  pushed over the store's pub/sub), so a request makes no read round trip;
  each outcome is written in one batch (`StateStore.batch`).

Instants are on a wall clock (`time.time` by default) because replicas on
different hosts share them; a monotonic clock is only meaningful within one
process. Any failure of the store is logged and absorbed here: health
bookkeeping never fails a request (views fall back to healthy, `acquire` to
yes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.health import records as hr
from gateway.health.breaker import BreakerPolicy, BreakerRecord, Window, after_failure, after_probe, after_success
from gateway.health.snapshot import CHANNEL, LocalHealth, message
from gateway.health.trials import Lease, TrialLeases
from gateway.health.view import BreakerState, HealthView
from gateway.providers import adapter_class
from gateway.providers._caller_text import caller_message_of
from gateway.providers.base import CALLER_DEADLINE, DELIVERY_NETWORK, GATEWAY_OVERLOADED, FailureClass, ProbeResult, ProviderError
from gateway.state.base import Op, StateStore

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
    - A timeout the caller's own deadline caused (code `caller_deadline`: the
      attempt had less time than the backend is expected to need,
      gateway/dispatch/blame.py): not the backend's failure; no effect. Its
      latency is not sampled either (it only says "took at least this"), and
      a half-open trial cut so gives its slot back, neither closing nor
      re-opening the breaker.
    """
    failure = error.failure
    if failure in (FailureClass.REJECTED, FailureClass.CONTENT_FILTERED) or error.code in (GATEWAY_OVERLOADED, DELIVERY_NETWORK, CALLER_DEADLINE):
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


@dataclass(slots=True)
class _Successes:
    """One backend's successes waiting to be written."""

    counts: dict[tuple[int, int], int] = field(default_factory=dict)  # (gen, bucket) -> successes
    latencies: list[float] = field(default_factory=list)  # oldest first


StateCallback = Callable[[str, BreakerState], None]
_CAS_TRIES = 4
_COST_KEYS = ("live_usd_per_image", "usd_per_image", "marginal_usd_per_image")


class HealthTracker:
    """Breakers, statistics, parking and live figures for every backend.

    `policies` and `kinds` are keyed by backend name (a name without a
    policy gets `default_policy`). Live figures older than `live_ttl_s` are
    ignored, so a stalled prober does not leave a stale queue wait behind.
    `refresh_s`: how often the local copy re-reads the store (`start()` runs
    it in the background; without it reads refresh inline when it is stale).
    `write_delay_s`: once started, successes are written together at most
    this late (one batch for all of them); a failure's batch carries the
    successes still waiting, so its open decision counts them.
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
        refresh_s: float = 0.25,
        write_delay_s: float = 0.02,
    ) -> None:
        self.store = store
        self._policies = dict(policies)
        self._queue_wait = {name: _reports_queue_wait(kind) for name, kind in kinds.items()}
        self._default = default_policy or BreakerPolicy()
        self._clock = clock
        self.live_ttl_s = live_ttl_s
        self._callbacks: list[StateCallback] = []
        self._seen: dict[str, BreakerState] = {}
        self._trials = TrialLeases(store)
        self.write_delay_s = write_delay_s
        self._waiting: dict[str, _Successes] = {}  # successes not yet written (started trackers only)
        self._writer: asyncio.Task[None] | None = None
        # What this process reads on a request's path: its own copy of every backend's records.
        self.local = LocalHealth(
            lambda: self.store,
            lambda n: self.policy(n).window_s,
            lambda n: self.policy(n).latency_samples,
            names=dict.fromkeys([*kinds, *policies]),
            refresh_s=refresh_s,
            clock=clock,
        )

    async def start(self) -> None:
        """Refresh the local copy now, then keep it current in the background
        (the refresh loop and the subscription to the store's channel)."""
        await self.local.start()

    async def close(self) -> None:
        """Write the successes still waiting, then stop the background."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer  # a write under way finishes (it holds successes no longer waiting)
        await self._write_waiting()
        await self.local.close()

    def policy(self, name: str) -> BreakerPolicy:
        return self._policies.get(name, self._default)

    def on_state_change(self, callback: StateCallback) -> None:
        """`callback(name, state)` whenever this replica sees a backend's
        breaker state change (its own transitions and ones read from the store)."""
        self._callbacks.append(callback)

    # ---- reading -----------------------------------------------------------

    async def views(self, names: Iterable[str]) -> dict[str, HealthView]:
        """From the local copy (no round trip once `start()`ed); derived at `now`,
        so cooldowns and parking end on time. A store that cannot be read leaves
        the last known state (healthy, if nothing was ever read)."""
        names = list(dict.fromkeys(names))
        try:
            await self.local.current(names)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("views", exc)
        now = self._clock()
        return {n: self._view(n, self.local.snapshot(n, now), now) for n in names}

    async def describe(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each backend's health as JSON-able data, for GET /v1/backends: read
        from the store, and the local copy refreshed on the way, so what it
        shows is what this replica routes on next."""
        names = list(dict.fromkeys(names))
        now = self._clock()
        try:
            for name in names:
                self.local.entry(name)
            await self._write_waiting()  # what it reads includes this replica's latest successes
            await self.local.refresh(own=True)
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
        rejected credentials, as the local copy says (no round trip); while
        half-open, the store's record is read fresh and an admission given to
        at most `half_open_max_trials` callers across all replicas (a SET NX
        lease with the request's own token, on that record's version). A
        store that cannot be read admits (health never fails a request); a
        lease that cannot be taken does not (a half-open backend gets one
        trial, not one per store error)."""
        now, policy = self._clock(), self.policy(name)
        try:
            await self.local.current([name])
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("acquire", exc)
        verdict = self._gate(name, self.local.snapshot(name, now), now)
        if not isinstance(verdict, BreakerState):  # HALF_OPEN: a trial is needed
            return verdict
        try:  # a trial slot hangs on the record's version: never take one on a copy
            snap = (await hr.read_snapshots(self.store, [name], now, {name: policy.window_s}, full=False))[name]
            self.local.apply_record(name, snap.raw_record, authoritative=True)
            self.local.apply_park(name, snap.parked_until)
            if snap.credentials_invalid:
                self.local.apply_credentials(name, True)
            verdict = self._gate(name, snap, now)
            if not isinstance(verdict, BreakerState):  # HALF_OPEN: a trial is needed
                return verdict
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("acquire", exc)
            return Admission(name)
        try:
            lease = await self._trials.take(name, snap.record, now, policy)
        except Exception as exc:  # noqa: BLE001 - half-open and no lease in hand: not a trial
            self._absorb("trial lease", exc)
            return None
        return Admission(name, lease) if lease is not None else None

    def _gate(self, name: str, snap: hr.Snapshot, now: float) -> Admission | BreakerState | None:
        """None (refused), an admission (closed), or HALF_OPEN (a trial is needed)."""
        state = snap.record.effective(now)
        self._observe(name, state)
        if snap.credentials_invalid or snap.parked_until > now or state is BreakerState.OPEN:
            return None
        if state is BreakerState.CLOSED:
            return Admission(name)
        return BreakerState.HALF_OPEN

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
        """A good answer, written in one batch; gives back `admission`'s trial
        lease (only that one). Closes a breaker the local copy holds half-open."""
        now, policy = self._clock(), self.policy(name)
        e = self.local.entry(name)
        raw, record = e.raw_record, e.record
        bucket = hr.bucket_of(now, policy.window_s)
        if self.local.running:  # written with other successes, at most write_delay_s later
            waiting = self._waiting.setdefault(name, _Successes())
            waiting.counts[(record.gen, bucket)] = waiting.counts.get((record.gen, bucket), 0) + 1
            waiting.latencies.append(latency_s)
            self.local.count(name, record.gen, bucket, False, self.local.counted(name, record.gen, bucket, False) + 1)
            self.local.sample(name, latency_s)
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write_later())
            try:
                if after_success(record, now) is not None:

                    async def closes(current: BreakerRecord) -> BreakerRecord | None:
                        return after_success(current, now)

                    await self._transition(name, raw, closes)
                await self.release(admission)
            except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
                self._absorb("record_success", exc)
            return
        try:
            counted, _, _ = await self.store.batch(
                [
                    Op.incr(hr.window_key(name, record.gen, bucket, "ok"), ttl_s=hr.window_ttl(policy.window_s)),
                    Op.set(hr.key(name, "consec"), "0", ttl_s=hr.NOTE_TTL_S),
                    self._sample_op(name, latency_s, policy),
                ]
            )
            self.local.count(name, record.gen, bucket, False, counted)
            self.local.sample(name, latency_s)
            if after_success(record, now) is not None:

                async def decide(current: BreakerRecord) -> BreakerRecord | None:
                    return after_success(current, now)

                await self._transition(name, raw, decide)
            await self.release(admission)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("record_success", exc)

    async def record_failure(self, name: str, error: ProviderError, latency_s: float | None = None, admission: Admission | None = None) -> None:
        """Apply `health_effect`, written in one batch that also reads the window
        back. A timeout's latency joins the samples (a lower bound that keeps
        p95 honest); other failures' latencies do not. Parkings and credentials
        marks are published to the other replicas. Gives back `admission`'s
        trial lease, never another request's."""
        now, policy = self._clock(), self.policy(name)
        effect = health_effect(
            error,
            reports_queue_wait=self._queue_wait.get(name, False),
            default_park_s=policy.default_park_s,
            out_of_credit_park_s=policy.out_of_credit_park_s,
        )
        e = self.local.entry(name)
        raw, record = e.raw_record, e.record
        # /v1/backends shows this note: the gateway's words, never the provider's.
        note = {"class": str(error.failure), "status": error.status, "message": caller_message_of(name, error), "at": now}
        ops = [Op.set(hr.key(name, "last_error"), json.dumps(note), ttl_s=hr.NOTE_TTL_S)]
        until = now + effect.park_s if effect.park_s else 0.0
        if effect.park_s:  # never shortening a longer parking already set
            ops += [Op.raise_to(hr.key(name, "park"), until, ttl_s=effect.park_s + 60.0), Op.publish(CHANNEL, message(name, "park", repr(until)))]
        if effect.mark_credentials_invalid:
            ops += [Op.set(hr.key(name, "creds"), repr(now), ttl_s=policy.credentials_recheck_s), Op.publish(CHANNEL, message(name, "creds", "1"))]
        waiting = self._waiting_ops()  # first: successes before this failure reset the run and count in its window
        ops = waiting + ops
        counts_at = len(ops)
        bucket = hr.bucket_of(now, policy.window_s)
        sampled = latency_s is not None and error.failure is FailureClass.UNKNOWN_OUTCOME
        if effect.counts_as_failure:
            ops += [Op.incr(hr.window_key(name, record.gen, bucket, "fail"), ttl_s=hr.window_ttl(policy.window_s)), Op.incr(hr.key(name, "consec"), ttl_s=hr.NOTE_TTL_S)]
            if sampled and latency_s is not None:
                ops.append(self._sample_op(name, latency_s, policy))
            ops += [Op.get(k) for k in hr.window_keys(name, record.gen, now, policy.window_s)]
        try:
            answers = await self.store.batch(ops)
            if effect.park_s:
                self.local.apply_park(name, until)
            if effect.mark_credentials_invalid:
                self.local.apply_credentials(name, True)
            if not effect.counts_as_failure:
                await self.release(admission)
                return
            self.local.count(name, record.gen, bucket, True, answers[counts_at])
            in_row = answers[counts_at + 1]
            if sampled and latency_s is not None:
                self.local.sample(name, latency_s)
            read = answers[-2 * hr.WINDOW_BUCKETS :]
            window = Window(ok=sum(hr.as_int(v) for v in read[0::2]), failed=sum(hr.as_int(v) for v in read[1::2]))

            async def decide(current: BreakerRecord) -> BreakerRecord | None:
                seen = window if current.gen == record.gen else await hr.read_window(self.store, name, current.gen, now, policy.window_s)
                return after_failure(current, now, policy, seen, in_row)

            await self._transition(name, raw, decide)
            await self.release(admission)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("record_failure", exc)

    async def record_probe(self, name: str, result: ProbeResult) -> None:
        """Store the probe and its live figures (one batch); a good probe clears
        a credentials mark and a probe whose key was refused sets one.
        Breaker effects: see `after_probe`."""
        now, policy = self._clock(), self.policy(name)
        e = self.local.entry(name)
        raw, was_invalid = e.raw_record, e.credentials_invalid
        note = {"ok": result.ok, "detail": hr.sanitise(result.detail), "latency_s": result.latency_s, "at": now}
        ops = [Op.set(hr.key(name, "last_probe"), json.dumps(note), ttl_s=hr.NOTE_TTL_S)]
        figures = hr.live_figures(result.live)
        doc = {"at": now, "figures": figures}
        if figures:
            ops.append(Op.set(hr.key(name, "live"), json.dumps(doc), ttl_s=self.live_ttl_s))
        if result.credentials_invalid:  # a probe is as good a witness of a revoked key as a request
            ops += [Op.set(hr.key(name, "creds"), repr(now), ttl_s=policy.credentials_recheck_s), Op.publish(CHANNEL, message(name, "creds", "1"))]
        if result.ok:
            ops += [Op.delete(hr.key(name, "creds")), Op.set(hr.key(name, "probe_fails"), "0", ttl_s=hr.NOTE_TTL_S)]
            if was_invalid or result.credentials_invalid:
                ops.append(Op.publish(CHANNEL, message(name, "creds", None)))
        else:
            ops.append(Op.incr(hr.key(name, "probe_fails"), ttl_s=hr.NOTE_TTL_S))
        try:
            answers = await self.store.batch(ops)
            if figures:
                self.local.apply_live(name, doc)
            if result.credentials_invalid or result.ok:
                self.local.apply_credentials(name, not result.ok)
            in_row = 0 if result.ok else answers[-1]

            async def decide(record: BreakerRecord) -> BreakerRecord | None:
                return after_probe(record, now, policy, result.ok, in_row)

            await self._transition(name, raw, decide)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail the request: absorbed and logged
            self._absorb("record_probe", exc)

    # ---- internals ---------------------------------------------------------

    def _waiting_ops(self) -> list[Op]:
        """The successes waiting to be written, as operations; no longer waiting."""
        waiting, self._waiting = self._waiting, {}
        ops: list[Op] = []
        for name, successes in waiting.items():
            policy = self.policy(name)
            for (gen, bucket), n in successes.counts.items():
                ops.append(Op.incr(hr.window_key(name, gen, bucket, "ok"), n, ttl_s=hr.window_ttl(policy.window_s)))
            ops.append(Op.set(hr.key(name, "consec"), "0", ttl_s=hr.NOTE_TTL_S))
            ops.append(Op.append(hr.key(name, "lat"), *successes.latencies, keep=policy.latency_samples, ttl_s=max(policy.window_s * 10, 600.0)))
        return ops

    async def _write_waiting(self) -> None:
        ops = self._waiting_ops()
        if not ops:
            return
        try:
            await self.store.batch(ops)
        except Exception as exc:  # noqa: BLE001 - a state-store failure must not fail a request: absorbed and logged
            self._absorb("record_success", exc)

    async def _write_later(self) -> None:
        while self._waiting:
            await asyncio.sleep(self.write_delay_s)
            await self._write_waiting()

    @staticmethod
    def _sample_op(name: str, latency_s: float, policy: BreakerPolicy) -> Op:
        return Op.append(hr.key(name, "lat"), latency_s, keep=policy.latency_samples, ttl_s=max(policy.window_s * 10, 600.0))

    async def _transition(self, name: str, raw: str | None, decide: Callable[[BreakerRecord], Any]) -> None:
        """Compare-and-set the breaker from `raw` (the local copy's record); on a
        lost race re-read and decide again. A transition is applied locally at
        once and published to the other replicas."""
        key = hr.key(name, "breaker")
        for _ in range(_CAS_TRIES):
            record = BreakerRecord.decode(raw)
            new = await decide(record)
            if new is None:
                return
            encoded = new.encode()
            if await self.store.compare_and_set(key, raw, encoded, ttl_s=hr.RECORD_TTL_S):
                self.local.apply_record(name, encoded, authoritative=True)
                await self.store.batch(
                    [
                        Op.set(hr.key(name, "consec"), "0", ttl_s=hr.NOTE_TTL_S),
                        Op.set(hr.key(name, "probe_fails"), "0", ttl_s=hr.NOTE_TTL_S),
                        Op.publish(CHANNEL, message(name, "breaker", encoded)),
                    ]
                )
                log.info("breaker %s: %s -> %s (cooldown %.1fs)", name, record.effective(new.since), new.state, new.cooldown_s)
                self._observe(name, new.state)
                return
            raw = await self.store.get(key)
            self.local.apply_record(name, raw, authoritative=True)  # the copy was behind: take the store's record

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
