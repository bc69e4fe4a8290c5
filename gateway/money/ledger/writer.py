"""The ledger writer: rows queue in memory and are written in batches, off the request path.

`record()` only appends to a list (no I/O on the event loop). A background
task writes whatever has queued every `interval_s` (or sooner once `batch`
rows wait) in one transaction, in a worker thread. A failed write keeps its
rows and retries on the next tick. `close()` writes everything still queued:
run it after the server has finished its in-flight requests (the app's
shutdown does), and a graceful shutdown loses no row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from gateway.money.ledger.rows import UsageRow
from gateway.money.ledger.stores import LedgerStore

log = logging.getLogger("klein.ledger")


class Ledger:
    def __init__(self, store: LedgerStore, *, interval_s: float = 0.25, batch: int = 500) -> None:
        self.store = store
        self.interval_s = interval_s
        self.batch = batch
        self._queued: list[UsageRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self.written = 0

    def start(self) -> None:
        if self._task is None:
            # Made on the loop that serves: an app started again (tests, an embedding host) gets a new loop.
            self._wake, self._write_lock = asyncio.Event(), asyncio.Lock()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, row: UsageRow) -> None:
        self._queued.append(row)
        if len(self._queued) >= self.batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queued)

    async def flush(self) -> None:
        """Write every queued row now (retrying is the caller's business)."""
        async with self._write_lock:
            rows, self._queued = self._queued, []
            if not rows:
                return
            try:
                await asyncio.to_thread(self.store.insert, rows)
            except BaseException:
                self._queued[:0] = rows  # keep order; written on the next try
                raise
            self.written += len(rows)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - the store is away; keep the rows
                log.error("usage ledger write failed, %d rows kept for the next try: %s", self.pending, type(exc).__name__)

    async def query(self, start: datetime, end: datetime, key_name: str | None = None) -> list[UsageRow]:
        await self.flush()  # a report includes the caller's last request
        return await asyncio.to_thread(self.store.fetch, start, end, key_name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for attempt in range(3):
            try:
                await self.flush()
                break
            except Exception as exc:  # noqa: BLE001
                log.error("usage ledger final write failed (try %d of 3): %s", attempt + 1, type(exc).__name__)
                await asyncio.sleep(0.5)
        if self._queued:
            log.error("usage ledger: %d rows could not be written at shutdown", len(self._queued))
        await asyncio.to_thread(self.store.close)
