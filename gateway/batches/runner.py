"""The batch driver: validates and prices a batch, then releases its lines as
async jobs, local or hosted as the scheduler says, and finalises its files.

Every replica runs a `BatchRunner`. Each second it looks at the batches not
yet ended and takes over any nobody drives (a lease in the state store with a
short TTL, renewed every tick), so a batch outlives the replica that started
it. A line's job has a fixed id (`line_job_id`) and is stored and queued in
one step only if absent (`JobStore.create_queued`): a new driver finds what
the old one released and never releases it again, and the job worker's own
takeover follows a running line's provider job instead of paying twice.

Each tick (`TICK_S`) the driver reads the jobs of the lines in flight,
counts what ended (and what the local GPU finished, which is how its rate is
learnt), asks `schedule.split` which pending lines the GPU can still finish
before the window's end less a margin, sends the rest to the cheapest hosted
backends at once and feeds the GPU its lines a few at a time. A line waits
(it is not failed) while the owner's rate limit refuses it; its budget is
reserved when its job runs, and a line the budget refuses is an error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.batches import output
from gateway.batches.model import BatchLine, BatchRecord, line_job_id
from gateway.batches.schedule import LineCost, LocalRate, Split, margin_s, split
from gateway.batches.store import BatchStore
from gateway.domain.errors import GatewayError, InvalidRequest
from gateway.domain.job import ImageJob
from gateway.health.view import HealthView
from gateway.jobs.model import JobRecord, job_to_dict
from gateway.money.tab import apply_key_rules
from gateway.routing.pricing import usd_text

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("klein.gateway.batches")

LineParser = Callable[[str | None, str, dict[str, Any]], Awaitable[ImageJob]]  # (owner, url, body) -> the job, or the caller's GatewayError
TICK_S = 0.5
LEASE_S = 10.0  # a driver silent this long has its batches taken over
SCAN_S = 1.0
HOSTED_DEADLINE_S = 600.0  # a spilled line's own deadline (within the window)
_READ_CHUNK = 200


def local_names(gw: Gateway) -> set[str]:
    return {name for name, b in gw.fleet.backends.items() if b.kind == "local"}


def _allowed(job: ImageJob, name: str) -> bool:
    """The line's own provider preferences (pin, only, ignore), as routing reads them."""
    if job.pinned_backend is not None:
        return job.pinned_backend.lower() == name.lower()
    if job.prefs.only and name.lower() not in {n.lower() for n in job.prefs.only}:
        return False
    return name.lower() not in {n.lower() for n in job.prefs.ignore}


def price_line(gw: Gateway, job: ImageJob, views: dict[str, HealthView]) -> tuple[float, Decimal | None, Decimal | None, str | None]:
    """(GPU work in MP, the local quote, the cheapest hosted quote, that backend) for one line."""
    local = local_names(gw)
    local_usd: Decimal | None = None
    hosted: tuple[Decimal, str] | None = None
    work = 0.0
    for cand in gw.fleet.candidates(job, views):
        if not cand.eligibility.ok or cand.quote is None or not _allowed(job, cand.name):
            continue
        if job.prefs.max_price is not None and cand.quote.usd > job.prefs.max_price:
            continue
        if cand.name in local:
            served = cand.served(job)
            work = served.width * served.height / 1e6 * served.n * served.steps / 4
            local_usd = cand.quote.usd if local_usd is None else min(local_usd, cand.quote.usd)
        elif hosted is None or (cand.quote.usd, cand.name) < hosted:
            hosted = (cand.quote.usd, cand.name)
    if not work:
        work = job.width * job.height / 1e6 * job.n * job.steps / 4
    return work, local_usd, hosted[0] if hosted else None, hosted[1] if hosted else None


def local_prior_mp_s(gw: Gateway) -> float:
    """The local GPU's throughput before any line has been measured: its price sheet's
    `seconds_per_image` at `reference_mp` (a gpu_time sheet), else 1 MP/s."""
    for backend in gw.fleet.backends.values():
        sheet = backend.sheet
        seconds, mp = getattr(sheet, "seconds_per_image", None), getattr(sheet, "reference_mp", None)
        if backend.kind == "local" and seconds and mp:
            return float(Decimal(mp) / Decimal(seconds))
    return 1.0


@dataclass
class Drive:
    """One batch, driven by this replica while it holds the lease."""

    gw: Gateway
    store: BatchStore
    parse_line: LineParser
    batch_id: str
    token: str
    lines: list[BatchLine] = field(default_factory=list)
    parsed: dict[int, ImageJob] = field(default_factory=dict)
    released: dict[int, str] = field(default_factory=dict)  # line index -> "local" | "hosted"
    in_flight: dict[int, str] = field(default_factory=dict)
    ended: dict[int, JobRecord] = field(default_factory=dict)  # counted once each
    rate: LocalRate | None = None
    cancels_sent: bool = False
    last_split: Split | None = None

    # ---- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        record = await self.store.get(self.batch_id)
        if record is None or record.terminal:
            return
        if record.status == "validating":
            record = await self._validate(record)
            if record is None or record.terminal:
                return
        else:
            await self._resume(record)
        self.rate = LocalRate(local_prior_mp_s(self.gw))
        while True:
            if not await self.store.renew(self.batch_id, self.token, LEASE_S):
                log.info("batch %s: lease lost; another replica drives it now", self.batch_id)
                return
            record = await self.store.get(self.batch_id)
            if record is None or record.terminal:
                return
            if await self._tick(record):
                return
            await asyncio.sleep(TICK_S)

    async def _validate(self, record: BatchRecord) -> BatchRecord | None:
        """Parse and price every line; a bad line fails alone, a missing file fails the batch."""
        found = await self.gw.files.content(record.owner, record.input_file_id)
        if found is None:
            await self._fail(record, "file_not_found", f"the input file {record.input_file_id} no longer exists")
            return None
        lines = await self.parse(record, found[1], keep=True)
        await self.store.set_lines(record.id, lines)
        self.lines = lines
        quote = quote_of(lines, window_s=record.window_s, rate_mp_s=local_prior_mp_s(self.gw))
        now = int(time.time())

        def start(r: BatchRecord) -> bool:
            if r.status != "validating":
                return False
            r.status, r.in_progress_at, r.total, r.quote = "in_progress", now, len(lines), quote
            return True

        updated = await self.store.update(record.id, start)
        if updated is not None and updated.status == "cancelling":  # cancelled while it was being read: nothing ran
            await self._finalize(updated, "cancelled")
            return None
        return updated

    async def parse(self, record: BatchRecord, data: bytes, *, keep: bool) -> list[BatchLine]:
        lines: list[BatchLine] = []
        owner = self.gw.keyring.named(record.owner)
        spec = owner.spec if owner is not None else None
        views = await self.gw.health.views(self.gw.fleet.backends)  # one health view prices every line alike
        index = 0
        for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
            if not raw.strip():
                continue
            entry = msgspec.json.decode(raw)  # checked line by line when the file was uploaded
            custom_id = entry["custom_id"]
            try:
                if entry["url"] != record.endpoint:
                    raise InvalidRequest(f"this line's url {entry['url']} differs from the batch's endpoint {record.endpoint}", param="url", code="invalid_url")
                job = apply_key_rules(await self.parse_line(record.owner, entry["url"], entry["body"]), spec)
            except GatewayError as err:
                lines.append(BatchLine(index, number, custom_id, error=err.envelope()["error"], status_code=err.status))
            else:
                self.parsed[index] = job
                if keep:
                    work, local_usd, hosted_usd, hosted_backend = price_line(self.gw, job, views)
                    lines.append(BatchLine(index, number, custom_id, work, local_usd, hosted_usd, hosted_backend))
            index += 1
            if index % 100 == 0:
                await asyncio.sleep(0)  # a 50,000-line file must not hold the loop
        return lines

    async def _resume(self, record: BatchRecord) -> None:
        """Take over a batch another replica drove: its lines, and which of them it released."""
        lines = await self.store.lines(record.id)
        found = await self.gw.files.content(record.owner, record.input_file_id)
        if lines is None or found is None:
            await self._fail(record, "file_not_found", "the batch's input is gone; it cannot be resumed")
            return
        self.lines = lines
        await self.parse(record, found[1], keep=False)
        local = local_names(self.gw)
        for start in range(0, len(lines), _READ_CHUNK):
            chunk = lines[start : start + _READ_CHUNK]
            for line, job in zip(chunk, await self.gw.jobs.store.get_many([line_job_id(record.id, ln.custom_id) for ln in chunk]), strict=True):
                if job is None:
                    continue
                prefs = job.job.get("prefs") or {}
                self.released[line.index] = "local" if (prefs.get("order") or [None])[0] in local else "hosted"
                if job.terminal:
                    self.ended[line.index] = job
                else:
                    self.in_flight[line.index] = self.released[line.index]
        log.info("batch %s: taken over with %d of %d lines released, %d ended", record.id, len(self.released), len(lines), len(self.ended))

    # ---- one tick ----------------------------------------------------------------

    async def _tick(self, record: BatchRecord) -> bool:
        """Count, schedule, release; True when the batch has ended."""
        now, mono = time.time(), time.monotonic()
        await self._collect(mono)
        assert self.rate is not None
        self.rate.busy(mono, any(where == "local" for where in self.in_flight.values()))
        if record.status == "cancelling":
            await self._cancel_in_flight(record)
            if not self.in_flight:
                await self._finalize(record, "cancelled")
                return True
            await self._note(record, now)
            return False
        pending = [ln for ln in self.lines if ln.error is None and ln.index not in self.released and ln.index in self.parsed]
        if now >= record.expires_at:
            if not self.in_flight:
                await self._finalize(record, "expired" if pending else "completed")
                return True
            await self._note(record, now)
            return False
        if not pending and not self.in_flight:
            await self._finalize(record, "completed")
            return True
        if pending:
            await self._release(record, pending, now)
            self.rate.busy(mono, any(where == "local" for where in self.in_flight.values()))
        await self._note(record, now)
        return False

    async def _collect(self, mono: float) -> None:
        if not self.in_flight:
            return
        indexes = list(self.in_flight)
        records = await self.gw.jobs.store.get_many([line_job_id(self.batch_id, self.lines[i].custom_id) for i in indexes])
        assert self.rate is not None
        for index, job in zip(indexes, records, strict=True):
            if job is None or not job.terminal:
                continue
            where = self.in_flight.pop(index)
            self.ended[index] = job
            served_locally = job.backend is not None and job.backend in local_names(self.gw)
            if where == "local" and served_locally and job.status == "succeeded":
                self.rate.completed(self.lines[index].work_mp, mono)
            self.gw.metrics.record_batch_line(self._state_of(job), job.cost_usd or Decimal(0))

    def _state_of(self, job: JobRecord) -> str:
        if job.status != "succeeded":
            return "failed" if job.status == "failed" else "cancelled"
        return "local" if job.backend in local_names(self.gw) else "hosted"

    async def _release(self, record: BatchRecord, pending: list[BatchLine], now: float) -> None:
        settings = self.gw.config.settings
        costs = [LineCost(ln.index, ln.work_mp, ln.local_usd, ln.hosted_usd, ln.hosted_backend) for ln in pending]
        assert self.rate is not None
        # The GPU's work in hand, less what it has likely done of it already (counted whole, the done part is planned twice).
        queued_mp = max(0.0, sum(self.lines[i].work_mp for i, where in self.in_flight.items() if where == "local") - self.rate.partial_mp)
        plan = split(costs, seconds_left=record.expires_at - now, rate_mp_s=self.rate.mp_per_s, local_queued_mp=queued_mp, margin_s=margin_s(record.window_s))
        self.last_split = plan
        hosted_free = settings.batch_hosted_slots - sum(1 for w in self.in_flight.values() if w == "hosted")
        local_free = settings.batch_local_slots - sum(1 for w in self.in_flight.values() if w == "local")
        for index in plan.spill[: max(0, hosted_free)]:
            if not await self._start(record, index, "hosted", now):
                return
        for index in plan.local[: max(0, local_free)]:
            if not await self._start(record, index, "local", now):
                return

    async def _start(self, record: BatchRecord, index: int, where: str, now: float) -> bool:
        """Store and queue the line's job; False when the owner's rate limit says wait."""
        line, job = self.lines[index], self.parsed[index]
        caller = self.gw.keyring.named(record.owner)
        spec = caller.spec if caller is not None else None
        if spec is not None and (spec.rate_limit.requests_per_minute or spec.rate_limit.images_per_minute):
            try:
                await self.gw.billing.limiter.admit(spec.name, spec.rate_limit, job.n)
            except GatewayError:
                return False  # the line waits for the next tick; nothing is failed for a rate limit
        local = sorted(local_names(self.gw))
        prefs = job.prefs
        if where == "hosted":
            prefs = dataclasses.replace(prefs, ignore=tuple(dict.fromkeys([*prefs.ignore, *local])))
        else:
            prefs = dataclasses.replace(prefs, order=tuple(dict.fromkeys([*local, *prefs.order])))
        seconds_left = max(1.0, record.expires_at - now)
        deadline = min(seconds_left, HOSTED_DEADLINE_S) if where == "hosted" else min(seconds_left, max(HOSTED_DEADLINE_S, self.gw.config.settings.async_deadline_s))
        job_id = line_job_id(record.id, line.custom_id)
        run = dataclasses.replace(job, prefs=prefs, deadline_s=deadline, request_id=job_id, caller=record.owner)
        created = JobRecord(
            id=job_id,
            owner=record.owner,
            route="edits" if record.endpoint.endswith("edits") else "generations",
            job=job_to_dict(run),
            base_url=record.base_url,
            created=now,
            batch={"id": record.id, "custom_id": line.custom_id, "index": index},
        )
        await self.gw.jobs.store.create_queued(created, self.gw.jobs.queue)  # False: an earlier driver made it; it is followed the same
        self.released[index] = self.in_flight[index] = where
        return True

    async def _cancel_in_flight(self, record: BatchRecord) -> None:
        if self.cancels_sent:
            return
        self.cancels_sent = True
        for index in list(self.in_flight):
            with contextlib.suppress(Exception):
                await self.gw.jobs.cancel(record.owner, line_job_id(record.id, self.lines[index].custom_id), self.gw.fleet, self.gw.metrics, wait_s=0)

    async def _note(self, record: BatchRecord, now: float) -> None:
        """The counts, the spend and the forecast on the record, when they changed."""
        counts = self._counts()
        forecast = None
        if self.last_split is not None:
            spent = counts["spent"]
            in_flight = sum((self._line_quote(i) for i in self.in_flight), Decimal(0))
            forecast = {"finish_at": int(now + self.last_split.forecast_finish_s), "cost_usd": usd_text(spent + in_flight + self.last_split.forecast_usd)}

        def note(r: BatchRecord) -> bool:
            before = (r.completed, r.failed, r.local, r.hosted, r.spent_usd, r.forecast)
            r.completed, r.failed, r.local, r.hosted, r.spent_usd = counts["completed"], counts["failed"], counts["local"], counts["hosted"], counts["spent"]
            r.forecast = forecast or r.forecast
            return before != (r.completed, r.failed, r.local, r.hosted, r.spent_usd, r.forecast)

        await self.store.update(record.id, note)

    def _line_quote(self, index: int) -> Decimal:
        line = self.lines[index]
        where = self.released.get(index)
        price = line.local_usd if where == "local" else line.hosted_usd
        return price or Decimal(0)

    def _counts(self) -> dict[str, Any]:
        completed = failed = local = hosted = 0
        spent = Decimal(0)
        names = local_names(self.gw)
        for job in self.ended.values():
            spent += job.cost_usd or Decimal(0)
            if job.status == "succeeded" or job.result is not None:
                completed += 1
                local, hosted = (local + 1, hosted) if job.backend in names else (local, hosted + 1)
            elif job.status == "failed":
                failed += 1
        failed += sum(1 for ln in self.lines if ln.error is not None)
        return {"completed": completed, "failed": failed, "local": local, "hosted": hosted, "spent": spent}

    # ---- the end -------------------------------------------------------------------

    async def _fail(self, record: BatchRecord, code: str, message: str) -> None:
        now = int(time.time())

        def fail(r: BatchRecord) -> bool:
            if r.terminal:
                return False
            r.status, r.failed_at, r.errors = "failed", now, [{"code": code, "message": message, "param": None, "line": None}]
            return True

        await self.store.update(record.id, fail)
        self.gw.metrics.record_batch_status("failed")

    async def _finalize(self, record: BatchRecord, status: str) -> None:
        """Write the output and error files from every line's end, then end the batch."""
        now = int(time.time())

        def finalizing(r: BatchRecord) -> bool:
            r.status, r.finalizing_at = "finalizing", r.finalizing_at or now
            return True

        if status != "cancelled":
            record = await self.store.update(record.id, finalizing) or record
        done: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        not_run = "batch_cancelled" if status == "cancelled" else "batch_expired"
        by_index = dict(self.ended)
        missing = [ln for ln in self.lines if ln.error is None and ln.index not in by_index and ln.index in self.released]
        for start in range(0, len(missing), _READ_CHUNK):
            chunk = missing[start : start + _READ_CHUNK]
            for line, job in zip(chunk, await self.gw.jobs.store.get_many([line_job_id(record.id, ln.custom_id) for ln in chunk]), strict=True):
                if job is not None and job.terminal:
                    by_index[line.index] = job
        for line in self.lines:
            if line.error is not None:
                errors.append(output.refused(record.id, line))
            elif line.index in by_index:
                ok, row = output.answered(record.id, line, by_index[line.index])
                (done if ok else errors).append(row)
            else:
                errors.append(output.not_run(record.id, line, not_run))
        files = self.gw.files
        out_id = err_id = None
        if done:
            out_id = (await files.create(record.owner, filename=f"{record.id}_output.jsonl", purpose="batch_output", data=output.jsonl(done))).id
        if errors:
            err_id = (await files.create(record.owner, filename=f"{record.id}_error.jsonl", purpose="batch_output", data=output.jsonl(errors))).id
        self.ended = by_index
        counts = self._counts()
        ended = int(time.time())

        def end(r: BatchRecord) -> bool:
            if r.terminal:
                return False
            r.output_file_id, r.error_file_id = out_id, err_id
            r.completed, r.failed, r.local, r.hosted, r.spent_usd = counts["completed"], counts["failed"], counts["local"], counts["hosted"], counts["spent"]
            r.status = status  # type: ignore[assignment]
            stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
            setattr(r, stamp, ended)
            r.forecast = None
            return True

        await self.store.update(record.id, end)
        self.gw.metrics.record_batch_status(status)
        log.info("batch %s %s: %d completed, %d failed, %s spent", record.id, status, counts["completed"], counts["failed"], usd_text(counts["spent"]))


def quote_of(lines: list[BatchLine], *, window_s: float, rate_mp_s: float) -> dict[str, Any]:
    """The batch's price before it starts: per line, in total under the scheduler's
    plan (with the local GPU's expected rate), all hosted, and all local."""
    costs = [LineCost(ln.index, ln.work_mp, ln.local_usd, ln.hosted_usd, ln.hosted_backend) for ln in lines if ln.error is None]
    plan = split(costs, seconds_left=window_s, rate_mp_s=rate_mp_s, local_queued_mp=0.0, margin_s=margin_s(window_s))
    hosted = [c.hosted_usd for c in costs if c.hosted_usd is not None]
    local = [c.local_usd for c in costs if c.local_usd is not None]
    return {
        "total_usd": usd_text(plan.forecast_usd),
        "all_hosted_usd": usd_text(sum(hosted, Decimal(0))) if len(hosted) == len(costs) else None,
        "all_local_usd": usd_text(sum(local, Decimal(0))) if len(local) == len(costs) else None,
        "lines_local": len(plan.local),
        "lines_hosted": len(plan.spill),
        "local_finish_s": round(plan.forecast_finish_s, 1),
        "lines": [ln.public_quote() for ln in lines],
    }


@dataclass
class BatchRunner:
    """Drives the batches this replica holds the lease of; takes over those nobody holds."""

    gw: Gateway
    store: BatchStore
    parse_line: LineParser
    _drives: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _scanner: asyncio.Task[None] | None = None
    _stopping: bool = False

    def start(self) -> None:
        self._scanner = asyncio.get_running_loop().create_task(self._scan())

    async def price(self, record: BatchRecord, data: bytes) -> list[BatchLine]:
        """The lines of `data` parsed and priced as the batch would be, without making it."""
        return await Drive(self.gw, self.store, self.parse_line, record.id, "").parse(record, data, keep=True)

    def kick(self, batch_id: str) -> None:
        """A batch was just made here: drive it now rather than at the next scan."""
        if not self._stopping and batch_id not in self._drives:
            self._drives[batch_id] = asyncio.get_running_loop().create_task(self._take(batch_id))

    async def _scan(self) -> None:
        while not self._stopping:
            with contextlib.suppress(Exception):
                for batch_id in await self.store.active():
                    self.kick(batch_id)
            await asyncio.sleep(SCAN_S)

    async def _take(self, batch_id: str) -> None:
        try:
            token = await self.store.lease(batch_id, LEASE_S)
            if token is None:
                return
            try:
                await Drive(self.gw, self.store, self.parse_line, batch_id, token).run()
            except asyncio.CancelledError:
                raise
            except Exception:  # the lease lapses and this or another replica retries the batch
                log.exception("batch %s: driver failed; it is taken over when its lease lapses", batch_id)
                return
            await self.store.release(batch_id, token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store outage: the next scan tries again
            log.warning("batch %s: could not be driven now (%s)", batch_id, type(exc).__name__)
        finally:
            self._drives.pop(batch_id, None)

    async def stop(self) -> None:
        """Stop driving: leases lapse and another replica (or the next start) takes the batches over."""
        self._stopping = True
        tasks = [t for t in (self._scanner, *self._drives.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
