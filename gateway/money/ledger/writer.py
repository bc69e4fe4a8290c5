"""The ledger writer: a request's usage row is durable before its answer is sent.

Two ways, by where the budget lives:

- With Redis (`stream` set, the fleet): `Billing.settle` appends the row to
  the ledger stream in the same Lua step that settles the budget
  (gateway/money/ledger/stream.py). This writer drains the stream: a batch is
  read through the consumer group, inserted in one transaction in a worker
  thread, then acknowledged and deleted. A batch whose insert fails is kept
  (at most `batch` rows) and tried again every `interval_s`; meanwhile new
  rows wait in the stream, not in memory. Entries a dead replica was given
  are claimed after the stream's `claim_idle_s`.
- Without Redis (one process, memory budgets): `record()` returns once the
  row is committed to the store. Rows recorded while a write is running join
  the next one (a group commit: one transaction for every row that waited).
  When the store fails, the rows are kept, up to `max_waiting`, and written
  by the background task once it is back; past that they are dropped, each
  one logged and counted (`klein_ledger_rows_lost_total`): never an
  unbounded list.

`klein_ledger_backlog_rows` is what waits (the stream's length, or the rows
kept after a failed write). `close()` writes what is left: run it after the
server has finished its in-flight requests (the app's shutdown does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from gateway.money.ledger.rows import UsageRow
from gateway.money.ledger.stores import LedgerStore
from gateway.money.ledger.stream import LedgerStream
from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger("klein.ledger")


class Ledger:
    def __init__(
        self,
        store: LedgerStore,
        *,
        interval_s: float = 0.25,
        batch: int = 500,
        max_waiting: int = 10_000,
        stream: LedgerStream | None = None,
        metrics: GatewayMetrics | None = None,
        close_drain_s: float = 5.0,
        report_wait_s: float = 2.0,
    ) -> None:
        self.report_wait_s = report_wait_s
        self.store = store
        self.stream = stream
        self.metrics = metrics
        self.interval_s = interval_s
        self.batch = batch
        self.max_waiting = max_waiting
        self.close_drain_s = close_drain_s
        self._queued: list[UsageRow] = []  # without a stream: rows whose write is running or failed
        self._commit: asyncio.Future[bool] | None = None  # resolved by the write that takes the queued rows
        self._failing = False
        self._held: list[tuple[str, UsageRow]] = []  # with a stream: a batch read whose insert failed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self.written = 0
        self.lost = 0

    def start(self) -> None:
        if self._task is None:
            # Made on the loop that serves: an app started again (tests, an embedding host) gets a new loop.
            self._wake, self._write_lock, self._commit = asyncio.Event(), asyncio.Lock(), None
            self._task = asyncio.get_running_loop().create_task(self._drain() if self.stream is not None else self._run())

    # ---- without a stream: written before the answer -------------------------

    async def record(self, row: UsageRow) -> bool:
        """Write `row` now; True once it is committed. False when the store is
        away: the row is kept for the background task (or dropped, logged and
        counted, when `max_waiting` rows already wait)."""
        if len(self._queued) >= self.max_waiting:
            self.lost += 1
            if self.metrics is not None:
                self.metrics.record_ledger_lost()
            log.error("usage ledger: store away and %d rows already waiting; row of request %s dropped", len(self._queued), row.request_id)
            return False
        self._queued.append(row)
        if self._commit is None:
            self._commit = asyncio.get_running_loop().create_future()
        done = self._commit
        if self._failing:
            self._set_backlog(len(self._queued))
            return False  # the background task writes it once the store answers again
        if self._task is None or self.stream is not None:  # not started (a test, a script), or a stream's fallback: write inline
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - kept in the queue; the failure is the store's, logged
                log.error("usage ledger write failed, %d rows kept: %s", self.pending, type(exc).__name__)
            return done.done() and done.result()
        self._wake.set()
        return await asyncio.shield(done)

    @property
    def pending(self) -> int:
        return len(self._queued) + len(self._held)

    async def flush(self) -> None:
        """Write every queued row now (retrying is the caller's business)."""
        async with self._write_lock:
            rows, self._queued = self._queued, []
            done, self._commit = self._commit, None
            if not rows:
                if done is not None and not done.done():
                    done.set_result(True)
                return
            try:
                await asyncio.to_thread(self.store.insert, rows)
            except BaseException:
                self._queued[:0] = rows  # keep order; written on the next try
                self._failing = True
                self._set_backlog(len(self._queued))
                if done is not None and not done.done():
                    done.set_result(False)
                raise
            self.written += len(rows)
            if self._failing:
                log.info("usage ledger store answers again: %d rows written", len(rows))
            self._failing = False
            self._set_backlog(len(self._queued))
            if done is not None and not done.done():
                done.set_result(True)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - the store is away; keep the rows
                log.error("usage ledger write failed, %d rows kept for the next try: %s", self.pending, type(exc).__name__)
                await asyncio.sleep(self.interval_s)

    # ---- with a stream: drained after the answer -----------------------------

    async def drain_once(self, block_ms: int | None = None) -> int:
        """Write one batch from the stream (a held one first, then entries a dead
        consumer left, then new ones); the number of rows written."""
        stream = self.stream
        if stream is None:
            return 0
        async with self._write_lock:
            entries = self._held or await stream.claim(self.batch)
            if not entries:
                entries = await stream.read(self.batch, block_ms)
            if not entries:
                return 0
            self._held = entries
            await asyncio.to_thread(self.store.insert, [row for _, row in entries])
            # Committed. Were the acknowledgement lost, the entries are claimed again later and
            # the store ignores rows it has: written once either way.
            self._held = []
            self.written += len(entries)
            await stream.ack([entry_id for entry_id, _ in entries])
            return len(entries)

    async def _drain(self) -> None:
        trouble = False
        while True:
            try:
                if self._queued:  # rows that reached neither the stream nor the store (Redis was away)
                    await self.flush()
                written = await self.drain_once(block_ms=max(1, int(self.interval_s * 1000)))
                await self._stream_backlog()
                if trouble and written:
                    log.info("usage ledger stream drains again")
                    trouble = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store or Redis is away; the rows wait in the stream
                if not trouble:
                    log.error("usage ledger stream drain failed, rows wait in the stream (%d held here): %s", len(self._held), type(exc).__name__)
                    trouble = True
                with contextlib.suppress(Exception):
                    await self._stream_backlog()
                await asyncio.sleep(self.interval_s)

    async def _stream_backlog(self) -> None:
        if self.stream is not None:
            self._set_backlog(await self.stream.backlog())

    def _set_backlog(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.set_ledger_backlog(rows)

    # ---- both ----------------------------------------------------------------

    async def query(self, start: datetime, end: datetime, key_name: str | None = None) -> list[UsageRow]:
        # A report includes the caller's last request: write what waits first, where that can be done now.
        if self.stream is not None:
            try:
                await self._written_through_now(self.stream)
            except Exception as exc:  # noqa: BLE001 - the report reads what the store has; the rest follows within the drain interval
                log.warning("usage ledger stream not drained before a report: %s", type(exc).__name__)
        else:
            await self.flush()
        return await asyncio.to_thread(self.store.fetch, start, end, key_name)

    async def _written_through_now(self, stream: LedgerStream) -> None:
        """Wait (at most `report_wait_s`) until every row in the stream when the report was asked for is
        written, by this replica or the one it was given to: a report includes the caller's last request."""
        newest = await stream.newest()
        if newest is None:
            return
        deadline = time.monotonic() + self.report_wait_s
        while await stream.holds_through(newest) and time.monotonic() < deadline:
            if await self.drain_once() == 0:
                await asyncio.sleep(0.02)  # given to another replica: it writes it within its drain interval

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.stream is not None:
            await self._close_stream(self.stream)
        if self._queued or self.stream is None:
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

    async def _close_stream(self, stream: LedgerStream) -> None:
        """Drain what the stream holds (for a while); what is left waits there for another replica, or the next start."""
        deadline = time.monotonic() + self.close_drain_s
        while time.monotonic() < deadline:
            try:
                if await self.drain_once() == 0:
                    break
            except Exception as exc:  # noqa: BLE001 - logged; the rows stay in the stream
                log.error("usage ledger stream not drained at shutdown (the rows stay in the stream): %s", type(exc).__name__)
                break
        with contextlib.suppress(Exception):
            left = await stream.backlog()
            if left:
                log.warning("usage ledger: %d rows wait in the stream for another replica or the next start", left)
        await stream.close()
