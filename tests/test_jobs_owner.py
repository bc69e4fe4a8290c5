"""An async job is paid for by the key that submitted it, on every run.

The worker runs in process over the real gateway (shipped providers and
prices, fake adapters that count their calls): a job whose owner's key was
revoked, or has no budget left, fails before any provider is called; a job
taken over from a dead replica reserves and settles in its owner's budget,
and a provider's implausible figure for it is treated as unknown."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.dispatch.produced import trusted_billed
from gateway.domain.job import ImageJob, JobKind
from gateway.jobs.model import JobRecord, job_to_dict, new_job_id
from gateway.jobs.worker import JobWorker
from gateway.money.budgets import to_units, windows_at, windows_to_json
from gateway.money.keys import hash_key
from gateway.money.ledger import UsageRow
from gateway.providers.base import GeneratedImage, ProviderResult
from tests.gateway_support import ENV, FakeAdapter, install_fakes, make_app, png_bytes

BACKENDS = ("fal", "replicate", "runflow", "empiriolabs", "local")
BUDGET = Decimal("0.05")


class ResumableFake(FakeAdapter):
    """A fake that can follow a job another replica submitted, reporting `reported` as its cost."""

    resumable = True

    def __init__(self, name: str, reported: Decimal | None = None) -> None:
        super().__init__(name)
        self.reported = reported
        self.resumed: list[list[str]] = []

    async def resume(self, job: ImageJob, job_ids: Sequence[str], deadline: float) -> ProviderResult:
        self.resumed.append(list(job_ids))
        images = [GeneratedImage(data=png_bytes(job.width, job.height), content_type="image/png", width=job.width, height=job.height) for _ in range(job.n)]
        return ProviderResult(images=images, reported_cost_usd=self.reported)


@dataclass
class Rig:
    gw: Any
    worker: JobWorker
    fakes: dict[str, FakeAdapter]
    rows: list[UsageRow]

    @property
    def provider_calls(self) -> int:
        return sum(len(f.calls) for f in self.fakes.values()) + sum(len(getattr(f, "resumed", [])) for f in self.fakes.values())

    async def spent(self, key: str) -> Decimal:
        windows = windows_at([("day", BUDGET)], datetime.now(UTC))
        return sum((Decimal(u) for u in await self.gw.billing.budgets.spent(key, windows)), Decimal(0)) * Decimal("1e-8")

    async def fill_budget(self, key: str) -> None:
        windows = windows_at([("day", BUDGET)], datetime.now(UTC))
        assert await self.gw.billing.budgets.reserve(key, windows, to_units(BUDGET)) is None

    async def run(self, owner: str | None, provider_jobs: dict[str, list[str]] | None = None, reservation: dict[str, Any] | None = None, runs: int = 1) -> JobRecord:
        job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=1024, height=1024, n=1)
        record = JobRecord(
            id=new_job_id(),
            owner=owner,
            route="generations",
            job=job_to_dict(job),
            base_url="http://127.0.0.1",
            created=time.time(),
            status="running",
            runs=runs,
            provider_jobs=provider_jobs or {},
            reservation=reservation,
        )
        await self.gw.jobs.store.create(record)
        await self.worker._run(record)
        done = await self.gw.jobs.store.get(record.id)
        assert done is not None
        return done


def keys_file(directory: Path, names: Sequence[str]) -> Path:
    path = directory / "keys.yaml"
    path.write_text("keys:\n" + "".join(f"  - name: {n}\n    key_sha256: {hash_key('secret-' + n)}\n    budget_usd: {{day: {BUDGET}}}\n" for n in names))
    return path


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    app = make_app({**ENV, "KLEIN_KEYS_FILE": str(keys_file(tmp_path, ["team-a"]))})
    fakes: dict[str, FakeAdapter] = {name: ResumableFake(name) for name in BACKENDS}
    install_fakes(app, fakes)
    gw = app.state.gateway
    rows: list[UsageRow] = []

    async def record(row: UsageRow) -> bool:
        rows.append(row)
        return True

    monkeypatch.setattr(gw.billing.ledger, "record", record)
    yield Rig(gw, JobWorker(gw, gw.jobs), fakes, rows)


@pytest.mark.parametrize(
    ("owner", "exhausted", "status", "code"),
    [
        ("team-gone", False, "failed", "owner_key_revoked"),  # removed from the keys file after submitting
        ("team-a", True, "failed", "budget_exhausted"),
        ("team-a", False, "succeeded", None),
        (None, False, "succeeded", None),  # submitted while the gateway ran open: allowed as before
    ],
)
async def test_a_queued_job_runs_only_while_its_owner_key_is_in_force_with_budget(rig: Rig, owner: str | None, exhausted: bool, status: str, code: str | None) -> None:
    if exhausted:
        await rig.fill_budget("team-a")
    done = await rig.run(owner)
    assert done.status == status
    assert (done.error or {}).get("code") == code
    assert (rig.provider_calls == 0) == (status == "failed")  # refused before any provider was called
    (row,) = rig.rows
    assert row.key_name == (owner or "anonymous")  # a revoked owner is never ledgered as anonymous
    if status == "failed":
        assert row.estimated_usd == 0


async def test_a_revoked_keys_queued_jobs_never_reach_a_provider(rig: Rig) -> None:
    done = [await rig.run("team-gone") for _ in range(6)]
    assert {d.error["code"] for d in done if d.error} == {"owner_key_revoked"} and len(done) == 6
    assert rig.provider_calls == 0
    assert all(r.key_name == "team-gone" and r.estimated_usd == 0 for r in rig.rows)


async def test_a_taken_over_job_reserves_and_settles_in_its_owners_budget(rig: Rig) -> None:
    done = await rig.run("team-a", provider_jobs={"fal": ["fal-req-1"]})
    assert done.status == "succeeded", done.error
    assert rig.fakes["fal"].resumed == [["fal-req-1"]] and not rig.fakes["fal"].calls  # followed, not paid again
    assert done.cost_usd is not None and done.cost_usd > 0
    assert await rig.spent("team-a") == done.cost_usd  # the budget holds exactly what the job cost
    (row,) = rig.rows
    assert (row.key_name, row.estimated_usd) == ("team-a", done.cost_usd)


async def test_a_taken_over_job_is_refused_before_the_provider_when_the_budget_is_spent(rig: Rig) -> None:
    await rig.fill_budget("team-a")
    done = await rig.run("team-a", provider_jobs={"fal": ["fal-req-1"]})
    assert done.status == "failed" and done.error is not None and done.error["code"] == "budget_exhausted"
    assert rig.fakes["fal"].resumed == []
    assert await rig.spent("team-a") == BUDGET  # nothing more reserved, nothing leaked


async def test_a_taken_over_job_settles_the_reservation_its_dead_run_left(rig: Rig) -> None:
    await rig.fill_budget("team-a")  # what the dead replica reserved, and never settled
    left = {"units": to_units(BUDGET), "windows": windows_to_json(windows_at([("day", BUDGET)], datetime.now(UTC)))}
    done = await rig.run("team-a", provider_jobs={"fal": ["fal-req-1"]}, reservation=left)
    assert done.status == "succeeded", done.error
    assert rig.fakes["fal"].resumed == [["fal-req-1"]]
    assert done.cost_usd is not None and await rig.spent("team-a") == done.cost_usd  # the dead run's hold became the cost
    assert done.reservation is None  # settled: a later takeover cannot release it again


async def test_each_run_of_a_job_has_its_own_ledger_row_numbered_by_the_run(rig: Rig) -> None:
    # The run stopped at a shutdown was settled as run 1; the takeover is run 2: (job id, run) is
    # the row's unique key in the ledger, so a redelivered row is written once and this one is not lost.
    done = await rig.run("team-a", provider_jobs={"fal": ["fal-req-1"]}, runs=2)
    assert done.status == "succeeded", done.error
    (row,) = rig.rows
    assert (row.request_id, row.run) == (done.id, 2)


async def test_a_run_notes_its_reservation_in_the_record_while_it_runs(rig: Rig) -> None:
    seen: list[dict[str, Any] | None] = []
    fal = rig.fakes["fal"]
    original = fal.generate

    async def generate(job: ImageJob, deadline: float) -> ProviderResult:
        (record,) = [r for r in [await rig.gw.jobs.store.get(i) for i in await rig.gw.jobs.store.ids("team-a", before=None, limit=5)] if r is not None]
        seen.append(record.reservation)
        return await original(job, deadline)

    for fake in rig.fakes.values():
        fake.generate = generate  # type: ignore[method-assign]
    done = await rig.run("team-a")
    assert done.status == "succeeded", done.error
    assert seen and seen[0] is not None and seen[0]["units"] > 0  # a replica taking over would find it
    assert done.reservation is None


@pytest.mark.parametrize("reported", [Decimal(-3), Decimal("NaN"), Decimal("Infinity"), Decimal(1000)])
async def test_a_taken_over_jobs_implausible_provider_figure_counts_as_the_quote(rig: Rig, reported: Decimal) -> None:
    fal = rig.fakes["fal"]
    assert isinstance(fal, ResumableFake)
    fal.reported = reported
    done = await rig.run("team-a", provider_jobs={"fal": ["fal-req-1"]})
    assert done.status == "succeeded", done.error
    job = ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=1024, height=1024, n=1)
    assert done.cost_usd == rig.gw.fleet.backends["fal"].bill(job, 1)
    (row,) = rig.rows
    assert row.estimated_usd == done.cost_usd and row.billed_usd is None


@pytest.mark.parametrize(
    ("reported", "quoted", "trusted"),
    [
        (None, Decimal("0.01"), None),
        (Decimal("0.012"), Decimal("0.01"), Decimal("0.012")),
        (Decimal(0), Decimal("0.01"), Decimal(0)),
        (Decimal(1), Decimal("0.01"), Decimal(1)),  # exactly 100 quotes: still a price
        (Decimal("1.00000001"), Decimal("0.01"), None),
        (Decimal(-3), Decimal("0.01"), None),
        (Decimal("NaN"), Decimal("0.01"), None),
        (Decimal("-Infinity"), Decimal("0.01"), None),
        (Decimal("0.002"), Decimal(0), Decimal("0.002")),  # a free quote bounds nothing
    ],
)
def test_a_providers_billed_figure_is_trusted_only_when_plausible(reported: Decimal | None, quoted: Decimal, trusted: Decimal | None) -> None:
    assert trusted_billed(reported, quoted) == trusted
