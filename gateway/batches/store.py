"""Where batches live: the state store (memory, or Redis shared by every replica).

Keys (logical; a Redis store adds `klein:<namespace>:`):

- `batch:<id>`: the record (JSON), changed by compare-and-set, so a cancel on
  one replica and the driver's counts on another never overwrite each other;
- `batch-lines:<id>`: the priced lines, written once when the batch is validated;
- `batches:of:<owner>`: the owner's batch ids, for listing;
- `batches:active`: the batches not yet ended, which every replica's driver
  looks at for one without a driver;
- `batch-lease:<id>`: who drives the batch now (a token with a short TTL the
  driver renews); when it lapses, another replica takes the batch over.

Every record is kept for `retention_s` (the file retention: as long as its
output file).
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import Callable

from gateway.batches.model import BatchLine, BatchRecord, valid_batch_id
from gateway.domain.errors import GatewayError
from gateway.state.base import StateStore

Change = Callable[[BatchRecord], bool]  # edits the record in place; False: nothing to write
ACTIVE = "batches:active"
_TRIES = 64


class BatchStoreBusy(GatewayError):
    status = 503
    type = "server_error"
    code = "batch_store_busy"
    retryable_default = True


def _owner(owner: str | None) -> str:
    return owner if owner is not None else "-"


class BatchStore:
    def __init__(self, state: StateStore, *, retention_s: int) -> None:
        self.state = state
        self.retention_s = retention_s

    async def create(self, record: BatchRecord) -> None:
        record.version = 1
        if not await self.state.set_if_absent_shared(f"batch:{record.id}", json.dumps(record.to_json()), ttl_s=self.retention_s):
            raise BatchStoreBusy("could not store the batch; retry", retry_after=1)
        await self._change_list(f"batches:of:{_owner(record.owner)}", lambda ids: [*ids, record.id])
        await self._change_list(ACTIVE, lambda ids: [*ids, record.id])

    async def get(self, batch_id: str) -> BatchRecord | None:
        if not valid_batch_id(batch_id):
            return None
        raw = await self.state.get_shared(f"batch:{batch_id}")
        return BatchRecord.from_json(json.loads(raw)) if raw else None

    async def update(self, batch_id: str, change: Change) -> BatchRecord | None:
        """Apply `change` by compare-and-set; the record as it now is (None if gone)."""
        key = f"batch:{batch_id}"
        for attempt in range(_TRIES):
            raw = await self.state.get_shared(key)
            if raw is None:
                return None
            record = BatchRecord.from_json(json.loads(raw))
            if not change(record):
                return record
            record.version += 1
            if await self.state.compare_and_set(key, raw, json.dumps(record.to_json()), ttl_s=self.retention_s):
                if record.terminal:
                    await self._change_list(ACTIVE, lambda ids: [i for i in ids if i != batch_id])
                return record
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
        raise BatchStoreBusy(f"batch {batch_id} is changing too often to update; retry", retry_after=1)

    async def set_lines(self, batch_id: str, lines: list[BatchLine]) -> None:
        await self.state.set(f"batch-lines:{batch_id}", json.dumps([line.to_json() for line in lines], separators=(",", ":")), ttl_s=self.retention_s)

    async def lines(self, batch_id: str) -> list[BatchLine] | None:
        raw = await self.state.get_shared(f"batch-lines:{batch_id}")
        return [BatchLine.from_json(row) for row in json.loads(raw)] if raw else None

    async def owned(self, owner: str | None, *, limit: int, after: str | None) -> tuple[list[BatchRecord], bool]:
        """The owner's batches, newest first, those after the batch `after`; and whether more follow."""
        ids = sorted(await self._ids(f"batches:of:{_owner(owner)}"), reverse=True)
        if after is not None:
            ids = [i for i in ids if i < after]
        found: list[BatchRecord] = []
        raws = await self.state.get_many([f"batch:{i}" for i in ids[: limit + 1]]) if ids else []
        for raw in raws:
            if raw is not None:
                record = BatchRecord.from_json(json.loads(raw))
                if record.owner == owner:
                    found.append(record)
        return found[:limit], len(ids) > limit

    async def active(self) -> list[str]:
        return await self._ids(ACTIVE)

    # ---- who drives a batch ---------------------------------------------------

    async def lease(self, batch_id: str, ttl_s: float) -> str | None:
        """Take the batch's lease when nobody holds it: the token to renew it with, or None."""
        token = secrets.token_hex(8)
        return token if await self.state.set_if_absent_shared(f"batch-lease:{batch_id}", token, ttl_s=ttl_s) else None

    async def renew(self, batch_id: str, token: str, ttl_s: float) -> bool:
        """Keep the lease; False when it lapsed and another replica took the batch."""
        return await self.state.compare_and_set(f"batch-lease:{batch_id}", token, token, ttl_s=ttl_s)

    async def release(self, batch_id: str, token: str) -> None:
        await self.state.compare_and_delete(f"batch-lease:{batch_id}", token)

    # ---- id lists --------------------------------------------------------------

    async def _ids(self, key: str) -> list[str]:
        raw = await self.state.get_shared(key)
        return list(json.loads(raw)) if raw else []

    async def _change_list(self, key: str, change: Callable[[list[str]], list[str]]) -> None:
        for attempt in range(_TRIES):
            raw = await self.state.get_shared(key)
            ids = change(list(json.loads(raw)) if raw else [])
            live = await self._live(ids)
            if await self.state.compare_and_set(key, raw, json.dumps(live), ttl_s=self.retention_s):
                return
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
        raise BatchStoreBusy("the batch index is busy; retry", retry_after=1)

    async def _live(self, ids: list[str]) -> list[str]:
        """Drop ids whose record expired, so an index never grows past the retention."""
        if len(ids) < 64:
            return ids
        raws = await self.state.get_many([f"batch:{i}" for i in ids])
        return [i for i, raw in zip(ids, raws, strict=True) if raw is not None]
