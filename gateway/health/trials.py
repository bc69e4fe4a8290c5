"""Half-open trial leases: at most N trial requests at once, across all replicas.

A lease is one key per slot, `health:<name>:trial:<version>:<slot>`, taken
with SET NX; <version> is the breaker record's, so a new opening starts with
fresh slots and old leases need no clean-up. The value is "<lapses at>
<token>": the instant the lease lapses on the tracker's clock (its TTL only
collects garbage), so a holder that died frees its slot after
`trial_timeout_s`, and a random token that names the request holding it.
Only that request gives the lease back (a compare-and-delete on its own
value): an outcome of some other request on the same backend, say a 422 of
a request admitted while the breaker was still closed, never frees a slot a
trial is running in.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from gateway.health import records as hr
from gateway.health.breaker import BreakerPolicy, BreakerRecord
from gateway.state.base import StateStore


@dataclass(slots=True)
class Lease:
    """One request's hold on one trial slot."""

    key: str
    value: str  # "<lapses at> <token>", exactly as stored
    returned: bool = False


def lapses_at(value: str | None) -> float:
    return hr.as_float((value or "").partition(" ")[0])


class TrialLeases:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def take(self, name: str, record: BreakerRecord, now: float, policy: BreakerPolicy) -> Lease | None:
        value, ttl = f"{now + policy.trial_timeout_s!r} {secrets.token_hex(8)}", policy.trial_timeout_s
        for slot in range(policy.half_open_max_trials):
            key = hr.key(name, "trial", record.version, slot)
            try:
                won = await self._store.set_if_absent(key, value, ttl_s=ttl)
            except Exception:
                # SET NX is never resent (it is not idempotent), but it may have run
                # although its answer was lost: the stored value says whose it is.
                if await self._store.get(key) != value:
                    raise
                won = True
            if not won:  # a lapsed lease is taken over atomically
                held = await self._store.get(key)
                won = held is not None and lapses_at(held) <= now
                won = won and await self._store.compare_and_set(key, held, value, ttl_s=ttl)
            if won:
                return Lease(key, value)
        return None

    async def give_back(self, lease: Lease | None) -> None:
        """Return `lease` if it is still this holder's; a second call does nothing."""
        if lease is None or lease.returned:
            return
        lease.returned = True
        await self._store.compare_and_delete(lease.key, lease.value)
