"""A shared store that degrades to memory: Redis failures never fail a request.

Every write goes to the primary (Redis) and is mirrored into the fallback
(memory), and so is every string the primary answers a read with (for
`mirror_ttl_s`, since a read does not carry the key's TTL; keys it answers
as absent are dropped). So when Redis goes away this replica carries on with
what it last knew, including what other replicas had learned: a breaker
another replica opened before the outage is still honoured during it. Values
that mean an instant (a cooldown, a parking) carry it in the value, so a
mirror outliving its meaning does no harm. While the primary is down (an error within `retry_interval_s`) calls
go straight to memory and a single call retries the primary once per
interval, so a dead Redis costs one bounded timeout per second, not one per
call, and `status()` says "degraded". The `*_shared` calls are the
exception: they raise `StoreUnavailable` instead of answering from memory,
for promises one replica's memory cannot keep (idempotency claims).

Resync when Redis returns: reads simply resume from Redis (the shared truth),
and the string keys this replica wrote while degraded (an opened breaker,
a parking, a credentials mark) are merged back with their remaining TTL.
Redis almost always still holds an older value of such a key (breaker
records live a day), so "set if absent" would throw away what was learned
alone; instead a merge rule (`merge`, passed in by whoever owns the keys:
the app passes `gateway.health.records.merge_pushed_back`) decides between the replica's value and
Redis's: the breaker record that changed last wins, the later parking
deadline wins, and keys without a rule are only set where absent. The write
is a compare-and-set against the value the rule saw, re-decided when
another replica wrote in between. Counters and latency samples from the
outage stay local: they age out of their windows within a minute anyway.

`batch` is one call to the primary, mirrored as the single operations are
(sets and counters into memory, reads mirrored, sets made while down marked
for the merge); `publish` and `listen` go to the primary only: while it is
down there is no one to tell, and the readers' periodic refresh covers what
a lost message said.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from gateway.state.base import Op, StateStore, StoreStatus, StoreUnavailable
from gateway.state.memory import MemoryStore

log = logging.getLogger(__name__)

T = TypeVar("T")
_FAILED: Any = object()
_MERGE_TRIES = 4

# (key, this replica's value, the primary's value or None) -> the value to
# write, or None to leave the primary's as it is.
Merge = Callable[[str, str, "str | None"], "str | None"]


def set_if_absent(key: str, mine: str, theirs: str | None) -> str | None:
    """The rule for keys nobody gave one: write back only where the primary holds nothing."""
    return mine if theirs is None else None


class ResilientStore(StateStore):
    def __init__(
        self,
        primary: StateStore,
        fallback: MemoryStore | None = None,
        *,
        retry_interval_s: float = 1.0,
        mirror_ttl_s: float = 300.0,
        max_dirty: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        merge: Merge = set_if_absent,
    ) -> None:
        self.primary = primary
        self.merge = merge
        self.fallback = fallback if fallback is not None else MemoryStore()
        self.retry_interval_s = retry_interval_s
        self.mirror_ttl_s = mirror_ttl_s
        self._max_dirty = max_dirty
        self._clock = clock
        self._up = True
        self._down_until = 0.0
        self._retrying = False  # one call at a time tries a primary that was down
        self._dirty: set[str] = set()
        self._undeleted: dict[str, str] = {}  # compare-and-deletes the primary missed: key -> expected
        self._resync: asyncio.Task[None] | None = None

    # ---- the circuit on the primary -------------------------------------------

    @property
    def degraded(self) -> bool:
        return not self._up

    def _usable(self) -> bool:
        """Up, or down with the retry due and no other call already retrying."""
        return self._up or (not self._retrying and self._clock() >= self._down_until)

    def _mark_down(self, exc: BaseException) -> None:
        if self._up:
            # The type only: messages can carry addresses; URLs can carry passwords.
            log.warning("state store unreachable (%s); carrying on in memory", type(exc).__name__)
        self._up = False
        self._down_until = self._clock() + self.retry_interval_s

    def _mark_up(self) -> None:
        if self._up:
            return
        self._up = True
        log.warning("state store reachable again; resyncing %d keys", len(self._dirty))
        if self._resync is None or self._resync.done():
            self._resync = asyncio.get_running_loop().create_task(self._push_back())

    async def _reached(self, call: Callable[[], Awaitable[object]]) -> bool:
        """Whether the primary took a call that answers nothing."""
        return await self._try(call) is not _FAILED

    async def _try(self, call: Callable[[], Awaitable[T]]) -> T:
        """The primary's answer, or _FAILED (without calling it while it is down)."""
        if not self._usable():
            return _FAILED
        retrying = not self._up
        self._retrying = self._retrying or retrying
        try:
            result = await call()
        except Exception as exc:  # noqa: BLE001 - any failure of the primary degrades
            self._mark_down(exc)
            return _FAILED
        finally:
            if retrying:
                self._retrying = False
        self._mark_up()
        return result

    def _dirtied(self, key: str) -> None:
        if len(self._dirty) < self._max_dirty:
            self._dirty.add(key)

    async def _push_back(self) -> None:
        try:
            await self.primary.reconnect()
        except Exception as exc:  # noqa: BLE001 - the writes below find out whether it is up
            log.warning("state store reconnect failed (%s)", type(exc).__name__)
        for key, expected in list(self._undeleted.items()):
            if await self._try(partial(self.primary.compare_and_delete, key, expected)) is _FAILED:
                return
            self._undeleted.pop(key, None)
        for key in list(self._dirty):
            exported = self.fallback.export(key)
            self._dirty.discard(key)
            if exported is None or exported[1] <= 0:
                continue
            value, ttl_s = exported
            if await self._merge_one(key, value, ttl_s) is _FAILED:
                self._dirty.add(key)
                return

    async def resynced(self) -> None:
        """Wait for a push-back under way, if any (for shutdown and tests)."""
        if self._resync is not None and not self._resync.done():
            await asyncio.shield(self._resync)

    async def _merge_one(self, key: str, mine: str, ttl_s: float) -> Any:
        """Write `mine` where the merge rule prefers it to the primary's value."""
        for _ in range(_MERGE_TRIES):
            theirs = await self._try(lambda: self.primary.get(key))
            if theirs is _FAILED:
                return _FAILED
            merged = self.merge(key, mine, theirs)
            if merged is None or merged == theirs:
                return None
            if theirs is None:
                won = await self._try(partial(self.primary.set_if_absent, key, merged, ttl_s=ttl_s))
            else:
                won = await self._try(partial(self.primary.compare_and_set, key, theirs, merged, ttl_s=ttl_s))
            if won is _FAILED:
                return _FAILED
            if won:
                await self.fallback.set(key, merged, ttl_s=ttl_s)
                return None
        return None

    # ---- StateStore ---------------------------------------------------------

    async def get(self, key: str) -> str | None:
        value = await self._try(lambda: self.primary.get(key))
        if value is _FAILED:
            return await self.fallback.get(key)
        self.fallback.mirror([(key, value)], ttl_s=self.mirror_ttl_s, keep=self._dirty)
        return value

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        values = await self._try(lambda: self.primary.get_many(keys))
        if values is _FAILED:
            return await self.fallback.get_many(keys)
        self.fallback.mirror(zip(keys, values, strict=True), ttl_s=self.mirror_ttl_s, keep=self._dirty)
        return values

    async def set(self, key: str, value: str, *, ttl_s: float) -> None:
        await self.fallback.set(key, value, ttl_s=ttl_s)
        if not await self._reached(functools.partial(self.primary.set, key, value, ttl_s=ttl_s)):
            self._dirtied(key)

    async def set_if_absent(self, key: str, value: str, *, ttl_s: float) -> bool:
        won = await self._try(lambda: self.primary.set_if_absent(key, value, ttl_s=ttl_s))
        if won is _FAILED:
            won = await self.fallback.set_if_absent(key, value, ttl_s=ttl_s)
            if won:
                self._dirtied(key)
        elif won:
            await self.fallback.set(key, value, ttl_s=ttl_s)
        return won

    async def set_if_absent_shared(self, key: str, value: str, *, ttl_s: float) -> bool:
        """On the primary only: a claim made in memory while it is down would be this replica's alone."""
        won = await self._try(lambda: self.primary.set_if_absent(key, value, ttl_s=ttl_s))
        if won is _FAILED:
            raise StoreUnavailable("the shared state store is unreachable")
        if won:
            await self.fallback.set(key, value, ttl_s=ttl_s)
        return won

    async def get_shared(self, key: str) -> str | None:
        value = await self._try(lambda: self.primary.get(key))
        if value is _FAILED:
            raise StoreUnavailable("the shared state store is unreachable")
        self.fallback.mirror([(key, value)], ttl_s=self.mirror_ttl_s, keep=self._dirty)
        return value

    async def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float) -> bool:
        won = await self._try(lambda: self.primary.compare_and_set(key, expected, value, ttl_s=ttl_s))
        if won is _FAILED:
            won = await self.fallback.compare_and_set(key, expected, value, ttl_s=ttl_s)
            if won:
                self._dirtied(key)
        elif won:
            await self.fallback.set(key, value, ttl_s=ttl_s)
        return won

    async def delete(self, key: str) -> None:
        await self.fallback.delete(key)
        self._dirty.discard(key)
        await self._try(lambda: self.primary.delete(key))

    async def compare_and_delete(self, key: str, expected: str) -> bool:
        """Both copies: a lease taken while Redis was down lives in memory only,
        one taken before lives in both."""
        mine = await self.fallback.compare_and_delete(key, expected)
        if mine:
            self._dirty.discard(key)
        theirs = await self._try(lambda: self.primary.compare_and_delete(key, expected))
        if theirs is _FAILED and len(self._undeleted) < self._max_dirty:
            self._undeleted[key] = expected  # a lease given back while Redis was away: free it there too
        return mine or (theirs is not _FAILED and bool(theirs))

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float) -> int:
        value = await self._try(lambda: self.primary.incr(key, amount, ttl_s=ttl_s))
        if value is _FAILED:
            return await self.fallback.incr(key, amount, ttl_s=ttl_s)
        await self.fallback.set(key, str(value), ttl_s=ttl_s)
        return value

    async def append_sample(self, key: str, value: float, *, keep: int, ttl_s: float) -> None:
        await self.fallback.append_sample(key, value, keep=keep, ttl_s=ttl_s)
        await self._try(lambda: self.primary.append_sample(key, value, keep=keep, ttl_s=ttl_s))

    async def samples(self, key: str) -> list[float]:
        values = await self._try(lambda: self.primary.samples(key))
        return await self.fallback.samples(key) if values is _FAILED else values

    async def batch(self, ops: Sequence[Op]) -> list[Any]:
        answers = await self._try(lambda: self.primary.batch(ops))
        if answers is _FAILED:
            answers = await self.fallback.batch([op for op in ops if op.kind != "publish"])
            if len(answers) != len(ops):  # put a None back where each publish was
                it = iter(answers)
                answers = [None if op.kind == "publish" else next(it) for op in ops]
            for op, answer in zip(ops, answers, strict=True):
                if op.kind == "set" or (op.kind == "raise_to" and answer):
                    self._dirtied(op.key)
                elif op.kind == "delete":
                    self._dirty.discard(op.key)
            return answers
        fallback, mirrored = self.fallback, []
        for op, answer in zip(ops, answers, strict=True):
            if op.kind == "get":
                mirrored.append((op.key, answer))
            elif op.kind == "set" or (op.kind == "raise_to" and answer):
                await fallback.set(op.key, op.value, ttl_s=op.ttl_s)
            elif op.kind == "incr":
                await fallback.set(op.key, str(answer), ttl_s=op.ttl_s)
            elif op.kind == "append":
                for number in op.numbers:
                    await fallback.append_sample(op.key, number, keep=op.keep, ttl_s=op.ttl_s)
            elif op.kind == "delete":
                await fallback.delete(op.key)
                self._dirty.discard(op.key)
        if mirrored:
            fallback.mirror(mirrored, ttl_s=self.mirror_ttl_s, keep=self._dirty)
        return answers

    async def publish(self, channel: str, message: str) -> None:
        await self._try(lambda: self.primary.publish(channel, message))

    async def listen(self, channel: str, on_message: Callable[[str], None]) -> None:
        await self.primary.listen(channel, on_message)

    def count_round_trips(self, hook: Callable[[str], None]) -> None:
        self.primary.count_round_trips(hook)

    async def status(self) -> StoreStatus:
        """Asks the primary (at most once per retry interval while it is down)."""
        answer = await self._try(self._ping)
        return "degraded" if answer is _FAILED else "ok"

    async def _ping(self) -> bool:
        if await self.primary.status() != "ok":
            raise ConnectionError("primary store did not answer")
        return True

    async def close(self) -> None:
        if self._resync is not None and not self._resync.done():
            self._resync.cancel()
            try:
                await self._resync
            except asyncio.CancelledError:
                pass
        await self.primary.close()
        await self.fallback.close()
