"""Each process's own copy of every backend's health, so routing reads no store.

`HealthTracker` (gateway/health/tracker.py) answers routing and the closed-breaker
case of `acquire` from this copy, without a round trip. It is kept current
three ways:

- what this process records is applied to it at once (its own breaker
  transitions, parkings, credentials marks, window counts, latency samples
  and probe figures), so a failure that opens a breaker here is seen here
  by the next request;
- breaker transitions, parkings and credentials marks are published on the
  store's channel `health` (Redis pub/sub: `klein:<namespace>:health`) and
  applied by every other process as they arrive;
- every `refresh_s` (250 ms by default, `gateway.health_refresh_ms`) one
  batched read of every backend's records replaces it, so a lost message,
  a replica that wrote during a Redis outage, or a counter another replica
  bumped, is seen within that interval.

Between refreshes the copy may lag the store by what other replicas counted
(window counts, latencies: they only order candidates) and by a message in
flight; a half-open breaker is always read fresh before a trial lease is
taken (gateway/health/trials.py), so the copy can never let a second trial
in. When the store cannot be read the copy keeps serving what it last knew.

Without `start()` (a tracker built by a test or a tool, with no event loop
task) reads refresh the copy inline once it is older than `refresh_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.health import records as hr
from gateway.health.breaker import BreakerRecord, Window
from gateway.state.base import Op, StateStore

log = logging.getLogger(__name__)

CHANNEL = "health"
CLOSE_TIMEOUT_S = 3.0
_SCALARS = ("breaker", "park", "creds", "live")
_MAX_BUCKETS = 4 * hr.WINDOW_BUCKETS


@dataclass(slots=True)
class Local:
    """What this process knows of one backend."""

    raw_record: str | None = None
    record: BreakerRecord = field(default_factory=BreakerRecord)
    parked_until: float = 0.0
    credentials_invalid: bool = False
    live: dict[str, Any] = field(default_factory=dict)
    buckets: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (gen, bucket) -> [ok, failed]
    latencies: list[float] = field(default_factory=list)  # newest first
    recent: list[tuple[int, float]] = field(default_factory=list)  # samples added here: (sequence, latency)
    touched: int = 0  # sequence of the last change to the fields above the buckets


def message(name: str, what: str, value: str | None) -> str:
    return json.dumps({"b": name, "k": what, "v": value}, separators=(",", ":"))


class LocalHealth:
    """The copy, its refresh task and its subscription."""

    def __init__(
        self,
        store: Callable[[], StateStore],
        window_s: Callable[[str], float],
        keep: Callable[[str], int],
        *,
        names: Iterable[str] = (),
        refresh_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store  # a getter: the tracker's store may be swapped (tests do)
        self._window_s = window_s
        self._keep = keep
        self.refresh_s = refresh_s
        self._clock = clock
        self._entries: dict[str, Local] = {}
        for name in names:
            self.entry(name)
        self._seq = 0
        self._refreshed_at: float | None = None  # time.monotonic() of the last refresh that answered
        self._refreshing: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._failing = False
        self.messages = 0  # applied from the channel (for tests and debugging)

    # ---- reading -------------------------------------------------------------

    def entry(self, name: str) -> Local:
        e = self._entries.get(name)
        if e is None:
            e = self._entries[name] = Local()
        return e

    def snapshot(self, name: str, now: float) -> hr.Snapshot:
        e = self.entry(name)
        return hr.Snapshot(
            raw_record=e.raw_record,
            record=e.record,
            parked_until=e.parked_until,
            credentials_invalid=e.credentials_invalid,
            window=self.window(name, now),
            latencies=e.latencies,
            live=e.live,
        )

    def window(self, name: str, now: float) -> Window:
        e = self.entry(name)
        last, gen = hr.bucket_of(now, self._window_s(name)), e.record.gen
        ok = failed = 0
        for b in range(last - hr.WINDOW_BUCKETS + 1, last + 1):
            counts = e.buckets.get((gen, b))
            if counts is not None:
                ok, failed = ok + counts[0], failed + counts[1]
        return Window(ok=ok, failed=failed)

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def current(self, names: Iterable[str] = ()) -> None:
        """Refresh inline if no background task keeps the copy current and it is
        stale or lacks one of `names` (the background picks a new name up at its
        next refresh)."""
        missing = False
        for name in names:
            if name not in self._entries:
                self.entry(name)
                missing = True
        if self.running:
            return
        if missing or self._refreshed_at is None or time.monotonic() - self._refreshed_at >= self.refresh_s:
            await self.refresh()

    # ---- what this process learned -------------------------------------------

    def _touch(self, e: Local) -> None:
        self._seq += 1
        e.touched = self._seq

    def apply_record(self, name: str, raw: str | None, *, authoritative: bool = False) -> bool:
        """Take a breaker record if it is newer than the one held (every write bumps
        its version); `authoritative` (a fresh read) takes it whatever its version."""
        e, record = self.entry(name), BreakerRecord.decode(raw)
        if raw == e.raw_record or (not authoritative and record.version <= e.record.version and e.raw_record is not None):
            return False
        e.raw_record, e.record = raw, record
        self._touch(e)
        return True

    def apply_park(self, name: str, until: float) -> None:
        e = self.entry(name)
        if until > e.parked_until:
            e.parked_until = until
            self._touch(e)

    def apply_credentials(self, name: str, invalid: bool) -> None:
        e = self.entry(name)
        e.credentials_invalid = invalid
        self._touch(e)

    def apply_live(self, name: str, doc: dict[str, Any]) -> None:
        e = self.entry(name)
        e.live = doc
        self._touch(e)

    def counted(self, name: str, gen: int, bucket: int, failed: bool) -> int:
        counts = self.entry(name).buckets.get((gen, bucket))
        return counts[1 if failed else 0] if counts else 0

    def count(self, name: str, gen: int, bucket: int, failed: bool, shared: int) -> None:
        """A counted outcome; `shared` is the store's count after it (all replicas')."""
        e = self.entry(name)
        counts = e.buckets.setdefault((gen, bucket), [0, 0])
        i = 1 if failed else 0
        counts[i] = max(counts[i], shared)  # the store's answer counts every earlier increment, this one too
        if len(e.buckets) > _MAX_BUCKETS:
            self._prune(e, bucket)

    def sample(self, name: str, latency_s: float) -> None:
        e, keep = self.entry(name), self._keep(name)
        self._seq += 1
        e.latencies = [latency_s, *e.latencies[: keep - 1]]
        e.recent.append((self._seq, latency_s))
        if len(e.recent) > keep:
            del e.recent[: len(e.recent) - keep]

    def on_message(self, text: str) -> None:
        """A message from the channel; a malformed one is dropped."""
        try:
            doc = json.loads(text)
            name, what, value = str(doc["b"]), doc["k"], doc["v"]
            if what == "breaker":
                self.apply_record(name, value)
            elif what == "park":
                self.apply_park(name, hr.as_float(value))
            elif what == "creds":
                self.apply_credentials(name, value is not None)
            else:
                return
        except (ValueError, TypeError, KeyError):
            return
        self.messages += 1

    # ---- refresh -------------------------------------------------------------

    async def refresh(self, *, own: bool = False) -> None:
        """Read every backend's records in one batch (one round trip) and take
        them; concurrent callers share one read, unless `own` (a read that
        begins after this call: one under way may predate what the caller
        wants seen). Raises what the store raised."""
        if self._refreshing is not None:
            if not own:
                return await self._join(self._refreshing)
            with contextlib.suppress(Exception):
                await self._join(self._refreshing)
            if self._refreshing is not None:  # another caller began one after it: that one is recent enough
                return await self._join(self._refreshing)
        done = self._refreshing = asyncio.get_running_loop().create_future()
        try:
            await self._refresh()
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: sharers that never came need not be told
            raise
        else:
            done.set_result(None)
        finally:
            self._refreshing = None

    @staticmethod
    async def _join(refreshing: asyncio.Future[None]) -> None:
        """Wait for a refresh another caller began; its cancellation (shutdown) is a failure here, not ours."""
        try:
            await asyncio.shield(refreshing)
        except asyncio.CancelledError:
            if refreshing.cancelled():
                raise RuntimeError("the health refresh was cancelled") from None
            raise

    async def _refresh(self) -> None:
        names, now, store, since = list(self._entries), self._clock(), self._store(), self._seq
        if not names:
            self._refreshed_at = time.monotonic()
            return
        gens = {n: self._entries[n].record.gen for n in names}
        keys = {n: hr.window_keys(n, gens[n], now, self._window_s(n)) for n in names}
        ops = [Op.get(hr.key(n, s)) for n in names for s in _SCALARS]
        ops += [Op.get(k) for n in names for k in keys[n]]
        ops += [Op.samples(hr.key(n, "lat")) for n in names]
        answers = await store.batch(ops)
        scalars, rest = answers[: len(names) * len(_SCALARS)], answers[len(names) * len(_SCALARS) :]
        per = 2 * hr.WINDOW_BUCKETS
        counts, samples = rest[: len(names) * per], rest[len(names) * per :]
        records = {n: scalars[i * len(_SCALARS)] for i, n in enumerate(names)}
        moved = [n for n in names if BreakerRecord.decode(records[n]).gen != gens[n]]
        if moved:  # a new window generation (a breaker closed elsewhere): read its counters too
            keys.update({n: hr.window_keys(n, BreakerRecord.decode(records[n]).gen, now, self._window_s(n)) for n in moved})
            again = await store.batch([Op.get(k) for n in moved for k in keys[n]])
            fresh = {n: again[i * per : (i + 1) * per] for i, n in enumerate(moved)}
        for i, name in enumerate(names):
            v = dict(zip(_SCALARS, scalars[i * len(_SCALARS) : (i + 1) * len(_SCALARS)], strict=True))
            mine = fresh[name] if name in moved else counts[i * per : (i + 1) * per]
            self._take(name, v, keys[name], mine, samples[i], since, now)
        self._refreshed_at = time.monotonic()

    def _take(self, name: str, v: dict[str, str | None], keys: Sequence[str], counts: Sequence[str | None], samples: list[float], since: int, now: float) -> None:
        e = self.entry(name)
        if e.touched <= since:  # nothing changed here while the read was under way: the store's word holds
            e.raw_record, e.record = v["breaker"], BreakerRecord.decode(v["breaker"])
            e.parked_until = hr.as_float(v["park"])
            e.credentials_invalid = v["creds"] is not None
            e.live = hr.as_doc(v["live"]) or {}
        else:  # learned here meanwhile: keep it unless the store holds something newer
            record = BreakerRecord.decode(v["breaker"])
            if record.version > e.record.version:
                e.raw_record, e.record = v["breaker"], record
            e.parked_until = max(e.parked_until, hr.as_float(v["park"]))
            live = hr.as_doc(v["live"]) or {}
            if hr.as_float(live.get("at")) > hr.as_float(e.live.get("at")):
                e.live = live
        self._prune(e, hr.bucket_of(now, self._window_s(name)))
        for k, raw in zip(keys, counts, strict=True):
            _, _, _, gen, bucket, outcome = k.split(":")
            slot = e.buckets.setdefault((int(gen), int(bucket)), [0, 0])
            i = 1 if outcome == "fail" else 0
            slot[i] = max(slot[i], hr.as_int(raw))
        newer = [lat for seq, lat in reversed(e.recent) if seq > since]
        e.latencies = (newer + samples)[: self._keep(name)]
        e.recent = [(seq, lat) for seq, lat in e.recent if seq > since]

    def _prune(self, e: Local, last: int) -> None:
        gen = e.record.gen
        for k in [k for k in e.buckets if k[0] != gen or k[1] <= last - hr.WINDOW_BUCKETS]:
            del e.buckets[k]

    # ---- the background ------------------------------------------------------

    async def start(self) -> None:
        """One refresh now, then the refresh loop and the subscription as tasks."""
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - the loop retries; health never fails start-up
            self._failed(exc)
        loop = asyncio.get_running_loop()
        self._closing = False
        self._tasks = [loop.create_task(self._refresh_loop()), loop.create_task(self._listen_loop())]
        await asyncio.sleep(0)  # let the subscription begin (in memory it is in place after this)

    async def close(self) -> None:
        """Stop the background, in bounded time: a cancel that lands while the
        store's client is closing a subscription can be swallowed by it, so the
        loops also stop at their next turn by `_closing`, and close waits at
        most CLOSE_TIMEOUT_S for them."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, _ = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.debug("health background task ended with %s", type(task.exception()).__name__)

    async def _refresh_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - keep serving the last known copy; retried next interval
                self._failed(exc)

    async def _listen_loop(self) -> None:
        while not self._closing:
            try:
                await self._store().listen(CHANNEL, self.on_message)
            except Exception as exc:  # noqa: BLE001 - resubscribe; the refresh covers what was missed
                log.debug("health channel subscription broke (%s); resubscribing", type(exc).__name__)
            await asyncio.sleep(1.0)

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning("health refresh failed (%s); serving the last known state", type(exc).__name__)
        self._failing = True
