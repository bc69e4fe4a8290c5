"""Half-open trial leases: at most N trial requests at once, across all replicas.

A lease is one key per slot, `health:<name>:trial:<version>:<slot>`, taken
with SET NX; <version> is the breaker record's, so a new opening starts with
fresh slots and old leases need no clean-up. The value is the instant the
lease lapses on the tracker's clock (its TTL only collects garbage), so a
holder that died frees its slot after `trial_timeout_s`.
"""

from __future__ import annotations

from gateway.state import health_records as hr
from gateway.state.base import StateStore
from gateway.state.breaker import BreakerPolicy, BreakerRecord


class TrialLeases:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._held: dict[str, list[str]] = {}  # leases this replica holds, by backend

    async def take(self, name: str, record: BreakerRecord, now: float, policy: BreakerPolicy) -> bool:
        until, ttl = repr(now + policy.trial_timeout_s), policy.trial_timeout_s
        for slot in range(policy.half_open_max_trials):
            key = hr.key(name, "trial", record.version, slot)
            won = await self._store.set_if_absent(key, until, ttl_s=ttl)
            if not won:  # a lapsed lease is taken over atomically
                held = await self._store.get(key)
                won = held is not None and hr.as_float(held) <= now
                won = won and await self._store.compare_and_set(key, held, until, ttl_s=ttl)
            if won:
                self._held.setdefault(name, []).append(key)
                return True
        return False

    async def give_back(self, name: str) -> None:
        """Return one lease this replica holds on `name`. Leases carry no
        request id, so any outcome on `name` returns one; a lease of a record
        that has since moved on is already meaningless."""
        held = self._held.get(name)
        if held:
            await self._store.delete(held.pop())
