"""The ledger stream: with Redis, a request's budget settle and its usage row are one step.

`settle()` runs one Lua script that adjusts the key's budget counters and
XADDs the usage row to the stream `klein:<namespace>:ledger`. Redis runs a
script whole or not at all, so a row exists for every settle the budget
counted, and none for a settle it did not: a replica killed after the answer
cannot lose the row, and the budget's spend equals the ledger's total.

Every replica drains the stream through the consumer group `ledger`
(gateway/money/ledger/writer.py): XREADGROUP, insert into the ledger store,
then XACK and XDEL once the insert committed. An entry delivered to a replica
that died before acknowledging it stays pending in the group; after
`claim_idle_s` another replica takes it over with XAUTOCLAIM. A row delivered
twice (the insert committed, the XACK never came) is written once: the store
ignores a row whose `row_id` or `(request_id, run)` it already has.

While the database is away the rows wait in the stream, not in memory; the
backlog (XLEN: entries not yet written, as written ones are deleted) is the
gauge `klein_ledger_backlog_rows`.

The budget counters and the stream are two Redis keys: on Redis Cluster they
would have to share a hash slot for one script to touch both, and the gateway
runs on one Redis (or a primary with replicas), not a Cluster.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from gateway.money.ledger.rows import UsageRow

GROUP = "ledger"

# KEYS[1]: the stream; KEYS[2..]: the budget counters to adjust (none for a key without
# budgets). ARGV[1]: the adjustment in units (may be negative; a counter never goes
# below zero); ARGV[2..]: the row's field/value pairs. Returns the entry id.
_SETTLE_AND_APPEND = """
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  for i = 2, #KEYS do
    local now = redis.call('INCRBY', KEYS[i], delta)
    if now < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[1], '*', unpack(fields))
"""


class StreamUnavailable(Exception):
    """Redis could not be reached: neither the budget nor the stream was changed (or the outcome is unknown)."""


def row_fields(row: UsageRow) -> dict[str, str]:
    """The row as stream entry fields (text; absent optional figures are left out)."""
    out = {
        "row_id": row.row_id,
        "at": row.at.isoformat(timespec="microseconds"),
        "request_id": row.request_id,
        "key_name": row.key_name,
        "route": row.route,
        "attempts": str(row.attempts),
        "images": str(row.images),
        "megapixels": f"{row.megapixels:f}",
        "estimated_usd": f"{row.estimated_usd:f}",
        "status": str(row.status),
    }
    if row.backend is not None:
        out["backend"] = row.backend
    if row.billed_usd is not None:
        out["billed_usd"] = f"{row.billed_usd:f}"
    if row.billed_source is not None:
        out["billed_source"] = row.billed_source
    if row.run is not None:
        out["run"] = str(row.run)
    return out


def row_from_fields(fields: dict[str, str]) -> UsageRow:
    billed = fields.get("billed_usd")
    run = fields.get("run")
    return UsageRow(
        row_id=fields["row_id"],
        at=datetime.fromisoformat(fields["at"]),
        request_id=fields["request_id"],
        key_name=fields["key_name"],
        route=fields["route"],
        backend=fields.get("backend"),
        attempts=int(fields["attempts"]),
        images=int(fields["images"]),
        megapixels=Decimal(fields["megapixels"]),
        estimated_usd=Decimal(fields["estimated_usd"]),
        billed_usd=None if billed is None else Decimal(billed),
        billed_source=fields.get("billed_source"),
        status=int(fields["status"]),
        run=None if run is None else int(run),
    )


class LedgerStream:
    """The stream of usage rows on the fleet's Redis, and this replica's consumer of it."""

    def __init__(self, url: str, *, namespace: str = "default", claim_idle_s: float = 30.0, socket_timeout: float = 2.0, consumer: str | None = None) -> None:
        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=2.0, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, decode_responses=True)
        self._client = aioredis.Redis(connection_pool=pool)
        self.key = f"klein:{namespace}:ledger"
        self.claim_idle_ms = max(1, int(claim_idle_s * 1000))
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._script = self._client.register_script(_SETTLE_AND_APPEND)
        self._group_ready = False

    async def settle(self, counters: list[str], delta_units: int, row: UsageRow) -> str:
        """Adjust `counters` by `delta_units` and append `row`, in one step; the entry id."""
        import redis

        args: list[Any] = [delta_units]
        for name, value in row_fields(row).items():
            args += [name, value]
        try:
            return str(await self._script(keys=[self.key, *counters], args=args))
        except (redis.RedisError, OSError) as exc:
            raise StreamUnavailable(type(exc).__name__) from None

    async def _ensure_group(self) -> None:
        import redis

        if self._group_ready:
            return
        try:
            # From the stream's start: rows appended before any replica made the group are drained too.
            await self._client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _grouped(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call()` on the consumer group; made again once if the stream was deleted under us (FLUSHDB, a Redis without persistence restarted)."""
        import redis

        await self._ensure_group()
        try:
            return await call()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no longer exists" not in str(exc):
                raise
        self._group_ready = False
        await self._ensure_group()
        return await call()

    async def claim(self, count: int) -> list[tuple[str, UsageRow]]:
        """Entries another consumer was given and has not acknowledged for `claim_idle_s` (it died, most likely)."""
        reply = await self._grouped(lambda: self._client.xautoclaim(self.key, GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=count))
        return self._entries(reply[1])

    async def read(self, count: int, block_ms: int | None = None) -> list[tuple[str, UsageRow]]:
        """Entries no consumer has been given yet, now given to this one."""
        reply = await self._grouped(lambda: self._client.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=count, block=block_ms))
        return [e for _, entries in reply or [] for e in self._entries(entries)]

    @staticmethod
    def _entries(entries: Any) -> list[tuple[str, UsageRow]]:
        # A claimed entry XDEL'd meanwhile comes back with no fields: it was written, skip it.
        out: list[tuple[str, UsageRow]] = []
        for entry in entries:
            entry_id, fields = entry[0], entry[1]
            if fields:
                out.append((str(entry_id), row_from_fields(fields)))
        return out

    async def ack(self, ids: list[str]) -> None:
        """Written: acknowledge and delete, so the stream holds only rows still to write."""
        if not ids:
            return
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, GROUP, *ids)
            pipe.xdel(self.key, *ids)
            await pipe.execute()

    async def newest(self) -> str | None:
        """The id of the newest row in the stream (None when it holds none)."""
        found: Any = await self._client.xrevrange(self.key, count=1)
        return str(found[0][0]) if found else None

    async def holds_through(self, entry_id: str) -> bool:
        """Whether a row appended at or before `entry_id` is still unwritten (written rows are deleted)."""
        return bool(await self._client.xrange(self.key, "-", entry_id, count=1))

    async def backlog(self) -> int:
        """Rows in the stream: appended, not yet written to the ledger store."""
        return int(await self._client.xlen(self.key))

    async def close(self) -> None:
        await self._client.aclose()
