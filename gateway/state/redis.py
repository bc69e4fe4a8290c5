"""Shared state in Redis (`REDIS_URL`), so every replica sees what one learned.

Keys are `klein:<namespace>:<logical key>`. Operations where replicas race
are single atomic commands (SET NX PX, INCRBY) or a Lua script (compare and
set); the others are MULTI pipelines. Timeouts are short (0.25 s by default).

Reads and idempotent writes (GET, MGET, SET, DEL) retry once, at once (a
pooled connection may be stale after Redis restarted; the retry reconnects).
Writes that are not idempotent (INCRBY, LPUSH, SET NX, the compare-and-set
and compare-and-delete scripts) go through a second pool that never retries:
a command that timed out may still run, and sending it again would count
twice or take a lease its sender then believes lost. Their failure is
raised; `ResilientStore` carries on in memory and, once Redis answers again,
drops that pool's idle connections so none of them is stale. A dead Redis
costs a couple of quick errors, after which `ResilientStore` stops asking
it for a while.

`batch` sends a list of operations as one pipeline (no MULTI: each
operation is atomic alone, the batch is one round trip); it goes through the
pool that never retries when it holds a write. `publish` and `listen` are
Redis pub/sub on `klein:<namespace>:<channel>`. `count_round_trips` hooks a
counter (the metric `klein_state_round_trips_total`) to every round trip.

Errors are raised, not hidden: wrap this store in `ResilientStore` to carry
on in memory when Redis is away. The URL (which may hold a password) never
appears in a log or an exception raised here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.state.base import READS, Op, StateStore, StoreStatus

_CAS = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur then return 0 end
elseif cur ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""

_CAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Set a number unless the stored one is at least as large: ARGV number, value, ttl ms.
_RAISE = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur and cur >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def _no_count(op: str) -> None:
    pass


def _ms(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


class RedisStore(StateStore):
    def __init__(self, client: aioredis.Redis, *, namespace: str = "default", once: aioredis.Redis | None = None) -> None:
        self._client = client  # reads and idempotent writes: may retry
        self._once = once if once is not None else client  # writes that must never be sent twice
        self._prefix = f"klein:{namespace}:"
        self._cas = self._once.register_script(_CAS)
        self._cad = self._once.register_script(_CAD)
        self._trip: Callable[[str], None] = _no_count

    def count_round_trips(self, hook: Callable[[str], None]) -> None:
        self._trip = hook

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "default",
        socket_timeout: float = 0.25,
        max_connections: int = 256,
    ) -> RedisStore:
        """Clients with bounded timeouts and bounded pools: one retries once at
        once (idempotent commands), the other never retries."""

        def pool(retries: int) -> aioredis.BlockingConnectionPool:
            return aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=socket_timeout,  # wait for a free connection at most this long
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), retries),
                decode_responses=True,
            )

        client = aioredis.Redis(connection_pool=pool(1))
        once = aioredis.Redis(connection_pool=pool(0))
        return cls(client, namespace=namespace, once=once)

    def _k(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> str | None:
        self._trip("get")
        return cast("str | None", await self._client.get(self._k(key)))  # decode_responses=True: str, never bytes

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        self._trip("get_many")
        return cast("list[str | None]", list(await self._client.mget([self._k(k) for k in keys])))

    async def set(self, key: str, value: str, *, ttl_s: float) -> None:
        self._trip("set")
        await self._client.set(self._k(key), value, px=_ms(ttl_s))

    async def set_if_absent(self, key: str, value: str, *, ttl_s: float) -> bool:
        self._trip("set_if_absent")
        return bool(await self._once.set(self._k(key), value, px=_ms(ttl_s), nx=True))

    async def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float) -> bool:
        args: list[str | int] = ["1", "", value, _ms(ttl_s)] if expected is None else ["0", expected, value, _ms(ttl_s)]
        self._trip("compare_and_set")
        return bool(await self._cas(keys=[self._k(key)], args=args))

    async def delete(self, key: str) -> None:
        self._trip("delete")
        await self._client.delete(self._k(key))

    async def compare_and_delete(self, key: str, expected: str) -> bool:
        self._trip("compare_and_delete")
        return bool(await self._cad(keys=[self._k(key)], args=[expected]))

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float) -> int:
        self._trip("incr")
        async with self._once.pipeline(transaction=True) as pipe:
            pipe.incrby(self._k(key), amount)
            pipe.pexpire(self._k(key), _ms(ttl_s))
            value, _ = await pipe.execute()
        return int(value)

    async def append_sample(self, key: str, value: float, *, keep: int, ttl_s: float) -> None:
        k = self._k(key)
        self._trip("append_sample")
        async with self._once.pipeline(transaction=True) as pipe:
            pipe.lpush(k, repr(float(value)))
            pipe.ltrim(k, 0, keep - 1)
            pipe.pexpire(k, _ms(ttl_s))
            await pipe.execute()

    async def samples(self, key: str) -> list[float]:
        self._trip("samples")
        return [float(v) for v in await self._client.lrange(self._k(key), 0, -1)]

    async def batch(self, ops: Sequence[Op]) -> list[Any]:
        """One pipeline; runs of gets become one MGET."""
        if not ops:
            return []
        writes = any(op.kind not in READS for op in ops)
        plan: list[tuple[str, int]] = []  # per operation: how to read its answer, and how many replies it takes
        async with (self._once if writes else self._client).pipeline(transaction=False) as pipe:
            i = 0
            while i < len(ops):
                op, k = ops[i], self._k(ops[i].key)
                if op.kind == "get":
                    j = i
                    while j < len(ops) and ops[j].kind == "get":
                        j += 1
                    pipe.mget([self._k(o.key) for o in ops[i:j]])
                    plan.append(("mget", 1))
                    i = j
                    continue
                if op.kind == "samples":
                    pipe.lrange(k, 0, -1)
                    plan.append(("samples", 1))
                elif op.kind == "set":
                    pipe.set(k, op.value, px=_ms(op.ttl_s))
                    plan.append(("none", 1))
                elif op.kind == "raise_to":
                    pipe.eval(_RAISE, 1, k, op.number, op.value, _ms(op.ttl_s))
                    plan.append(("bool", 1))
                elif op.kind == "delete":
                    pipe.delete(k)
                    plan.append(("none", 1))
                elif op.kind == "incr":
                    pipe.incrby(k, op.amount)
                    pipe.pexpire(k, _ms(op.ttl_s))
                    plan.append(("int", 2))
                elif op.kind == "append":
                    pipe.lpush(k, *[repr(n) for n in op.numbers])
                    pipe.ltrim(k, 0, op.keep - 1)
                    pipe.pexpire(k, _ms(op.ttl_s))
                    plan.append(("none", 3))
                else:
                    pipe.publish(k, op.value)
                    plan.append(("none", 1))
                i += 1
            self._trip("batch_write" if writes else "batch_read")
            replies = await pipe.execute()
        out: list[Any] = []
        pos = 0
        for how, n in plan:
            reply = replies[pos]
            if how == "mget":
                out.extend(reply)
            elif how == "samples":
                out.append([float(v) for v in reply])
            elif how == "bool":
                out.append(bool(reply))
            elif how == "int":
                out.append(int(reply))
            else:
                out.append(None)
            pos += n
        return out

    async def publish(self, channel: str, message: str) -> None:
        self._trip("publish")
        await self._once.publish(self._k(channel), message)

    async def listen(self, channel: str, on_message: Callable[[str], None]) -> None:
        """A dedicated connection, subscribed until cancelled; a broken one raises."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._k(channel))
            self._trip("subscribe")
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    on_message(message["data"])
        finally:
            await pubsub.aclose()

    async def status(self) -> StoreStatus:
        self._trip("status")
        try:
            await self._client.ping()
        except Exception:  # noqa: BLE001 - any failure means not reachable
            return "degraded"
        return "ok"

    async def ping(self) -> None:
        """Raises when Redis does not answer."""
        await self._client.ping()

    async def reconnect(self) -> None:
        """Drop the idle connections of the pool that never retries: after an
        outage they may be stale, and a stale one would fail its next command."""
        if self._once is not self._client:
            await self._once.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        for client in {id(c): c for c in (self._client, self._once)}.values():
            await client.aclose()
            await client.connection_pool.disconnect()
