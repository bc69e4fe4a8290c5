"""The chaos table: every emulator fault kind at every position of the price ladder.

Three emulated backends are enabled; at 512x512 the shipped sheets order them
local (cheapest) < fal (middle) < runflow (last). A row injects one fault
kind, at rate 1, into the backend at its position *and every cheaper one*, so
each request has to walk through the faults before it reaches a healthy
backend:

- cheapest: local faulty; fal and runflow healthy -> every request succeeds;
- middle:   local and fal faulty; runflow healthy  -> every request succeeds;
- last:     all three faulty, none healthy         -> a clean 502/503/504 in
  the OpenAI error envelope, inside the request's deadline.

(Faulting only the middle or the last backend would test nothing: the
cheaper healthy backend would serve every request before they are reached.)

Each row is a fresh in-process gateway (fresh breakers and metrics) served by
uvicorn on a free loopback port. Rows run in a few lanes at once, each lane
with an emulator fleet of its own (knobs are per emulator), so the slow fault
kinds (stuck, timeout) do not add up. Each row sends a wave of concurrent
requests, which all meet the faults, then one more, which meets the breakers
the wave opened. The backends' request timeout is 1 s (a test rig's choice,
written into the row's providers.yaml) so a held or stuck sync backend costs
one second, not the shipped 30 to 120; an async job stuck in a queue costs
what dispatch gives the attempt (at least 5 s while there is time left,
gateway/dispatch/attempts.py MIN_ATTEMPT_S), so the healthy rows use an 8 s deadline
and the rows without a healthy backend the 3 s the issue asks for.

Three rows go beyond the fault x position grid, each with the cheapest
backend (local) as the one in trouble:

- trickle: local sends its answer 1 KiB every 50 ms, so no per-read timeout
  fires; dispatch cuts the attempt at its share of the deadline and fal
  serves. The local attempt was sent and its outcome is unknown.
- truncated_upload: edits whose reference PNG is cut in half (its header
  intact, so header-only checks pass), then a good request. The bad uploads
  are refused on arrival with 422 (the gateway decodes every reference) and
  must not take the cheapest backend out of rotation: the good request
  afterwards is still served by local.
- redis_outage: the gateway keeps its state in a real redis-server; local
  answers 500 until its breaker opens, then Redis is stopped, and the
  requests during the outage still go around the open breaker and succeed.

How the two money columns read:
- dbl_spend (klein_possible_double_spend_total) counts attempts made after
  an earlier attempt of the same request may have bought an image nobody
  got: an unknown outcome whose cancel was not confirmed, or a billed
  generation whose images could not be delivered. Only the rows whose
  faults leave the outcome unknown (timeout, stuck, trickle) may have any.
- poss_billed counts answers carrying x-klein-possibly-billed-usd (with
  their sum, from klein_possibly_billed_usd_total): attempts of unknown
  outcome that were not confirmed cancelled, reported apart from what was
  surely billed (x-klein-cost-usd). A stuck fal job that fal confirms
  cancelled is neither billed nor possibly billed; a sync backend held past
  its timeout has no job id to cancel, so it is possibly billed.

The table of requests, successes, failovers and possible double spends (read
from klein_failovers_total and klein_possible_double_spend_total), with the
provider jobs the faulty emulators saw cancelled, is printed
at the end, shown even without `-s`, and stored as the test's
`chaos_table` property for the JUnit report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.emulators import EmulatorFleet
from tests.gateway_support import PROVIDERS_YAML, ServerThread, make_app, png_bytes
from tests.redis_server import RedisServer, redis_available

ORDER = ["local", "fal", "runflow"]  # cheapest -> last at 512x512 (checked by test_the_ladder_is_as_the_table_assumes)
POSITIONS = {"cheapest": 1, "middle": 2, "last": 3}  # how many of ORDER are faulty
BODY = {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "url"}
WAVE = 3  # concurrent requests that all meet the faults
HEALTHY_DEADLINE_MS = 8000
NONE_HEALTHY_DEADLINE_MS = 3000

# Emulator knobs per fault kind (tests/emulators/knobs.py FAULT_KINDS).
FAULTS: dict[str, dict] = {
    "server_error": {"server_error": 1.0, "server_error_status": 500},  # 5xx
    "rate_limited": {"rate_limited": 1.0, "retry_after_s": 1.0},  # 429 with Retry-After
    "out_of_credit": {"out_of_credit": 1.0},  # 402 (fal: 403 exhausted balance)
    "timeout": {"timeout": 1.0},  # held past the client's timeout
    "reset": {"reset": 1.0},  # TCP RST, no response
    "malformed": {"malformed": 1.0},  # 200 with truncated JSON
    "stuck": {"stuck": 1.0},  # never leaves the queue (sync backends: held)
    "job_failed": {"job_failed": 1.0},  # fal: COMPLETED with error; runflow: run failed; local: 500
}
# Faults whose outcome is unknown to the gateway (the work may exist and be billed):
# moving on after them is a possible double spend, and must be counted.
UNKNOWN_OUTCOME_FAULTS = {"timeout", "stuck"}
# Faults that every backend here counts against health (or parks on) once: after
# the wave, the follow-up request must not call the faulty backends again.
# Not rate_limited: local's 429 neither parks nor counts, and parking is only 1 s.
ROUTED_AROUND_AFTER_WAVE = {"server_error", "out_of_credit", "timeout", "reset", "malformed", "stuck", "job_failed"}

# Rows beyond the grid (see the module docstring); local is the backend in trouble.
TRICKLE = {"trickle": {"chunk_bytes": 1024, "interval_ms": 50}, "pad_to_bytes": 200_000}
SPECIAL = ["trickle", "truncated_upload", *(["redis_outage"] if redis_available() else [])]
UNKNOWN_OUTCOME_FAULTS.add("trickle")
ROUTED_AROUND_AFTER_WAVE.add("trickle")

ROWS = [(fault, position) for fault in FAULTS for position in POSITIONS] + [(name, "cheapest") for name in SPECIAL]
# Lanes run side by side, balanced by what their rows wait for (the slow
# rows are those of stuck and timeout); rows not named go to the last lane.
LANES: list[list[tuple[str, str]]] = [
    [("stuck", "last"), *(("server_error", p) for p in POSITIONS)],
    [("stuck", "middle"), ("stuck", "cheapest"), *(("rate_limited", p) for p in POSITIONS)],
    [("timeout", p) for p in POSITIONS],
    [(name, "cheapest") for name in SPECIAL],
    [],
]
LANES[-1] = [row for row in ROWS if not any(row in lane for lane in LANES)]


@dataclass
class RowResult:
    fault: str
    position: str
    faulty: list[str]
    deadline_ms: int
    statuses: list[int] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    served_by: list[str] = field(default_factory=list)
    envelopes_ok: list[bool] = field(default_factory=list)
    failovers: float = 0.0
    double_spend: float = 0.0
    followup_faulty_calls: int = 0
    cancels: int = 0  # provider jobs the faulty backends saw cancelled
    fal_unknown: float = 0.0  # fal attempts that ended with the job's outcome unknown
    fal_open: int = 0  # fal jobs not ended (cancelled, dropped or done) once the row is over
    possibly_billed_answers: int = 0  # answers carrying x-klein-possibly-billed-usd
    possibly_billed_usd: float = 0.0  # klein_possibly_billed_usd_total
    followup_served_by: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.statuses)

    @property
    def successes(self) -> int:
        return sum(1 for s in self.statuses if s == 200)


@pytest.fixture(scope="module")
def fleets() -> Iterator[list[EmulatorFleet]]:
    """One emulator fleet per lane, each in its own thread and event loop."""
    started: list[EmulatorFleet] = []
    try:
        for _ in LANES:
            started.append(EmulatorFleet.start_in_thread(ORDER))
        yield started
    finally:
        for fleet in started:
            fleet.stop_thread()


@pytest.fixture
def fleet(fleets: list[EmulatorFleet]) -> EmulatorFleet:
    return fleets[0]


@pytest.fixture(scope="module")
def chaos_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped providers.yaml with test-rig timeouts: 1 s per HTTP exchange, quick polls."""
    root = tmp_path_factory.mktemp("chaos")
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    for backend in raw["backends"].values():
        backend["timeouts"] = {"connect": 1.0, "request": 1.0, "poll_interval": 0.05, "max_poll_interval": 0.2}
    path = root / "providers.yaml"
    path.write_text(yaml.safe_dump(raw))
    (root / "pricing").symlink_to(PROVIDERS_YAML.parent / "pricing")
    return path


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a counter over the label sets that carry `labels`, from Prometheus text."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def paid_calls(client: httpx.Client, fleet: EmulatorFleet, names: list[str]) -> int:
    return sum(client.get(f"{fleet[n].base_url}/_admin/stats").json()["paid_calls"] for n in names)


def is_clean_envelope(resp: httpx.Response) -> bool:
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return all(k in error for k in ("message", "type", "param", "code")) and isinstance(error["message"], str)


def row_knobs(fault: str) -> dict | None:
    """The emulator knobs a row sets on its faulty backends (None: none)."""
    if fault == "trickle":
        return TRICKLE
    if fault == "truncated_upload":
        return None  # the trouble is in the requests, not the backend
    return {"faults": FAULTS["server_error" if fault == "redis_outage" else fault]}


def run_row(fleet: EmulatorFleet, config: Path, fault: str, position: str) -> RowResult:
    faulty = ORDER[: POSITIONS[position]]
    none_healthy = len(faulty) == len(ORDER)
    row = RowResult(fault, position, faulty, NONE_HEALTHY_DEADLINE_MS if none_healthy else HEALTHY_DEADLINE_MS)
    fleet.reset()
    redis = RedisServer().start() if fault == "redis_outage" else None
    env = fleet.env() | ({"REDIS_URL": redis.url, "KLEIN_STATE_NAMESPACE": "chaos"} if redis else {})
    app = make_app(env=env, config=config)
    knobs = row_knobs(fault)
    try:
        with ServerThread(app) as server, httpx.Client(timeout=30) as client:
            for name in faulty if knobs else ():
                resp = client.post(f"{fleet[name].base_url}/_admin/knobs", json=knobs)
                assert resp.status_code == 200, resp.text
            headers = {"x-klein-deadline-ms": str(row.deadline_ms)}

            def one(index: int) -> tuple[int, float, str, bool, bool]:
                t0 = time.monotonic()
                if fault == "truncated_upload" and index < WAVE:
                    files = {"image": ("cut.png", TRUNCATED_PNG, "image/png")}
                    resp = client.post(f"{server.url}/v1/images/edits", files=files, data={"prompt": BODY["prompt"], "size": BODY["size"]}, headers=headers)
                else:
                    resp = client.post(f"{server.url}/v1/images/generations", json=BODY, headers=headers)
                elapsed = time.monotonic() - t0
                envelope_ok = resp.status_code == 200 or is_clean_envelope(resp)
                return resp.status_code, elapsed, resp.headers.get("x-klein-backend", "-"), envelope_ok, "x-klein-possibly-billed-usd" in resp.headers

            with ThreadPoolExecutor(WAVE) as pool:
                outcomes = list(pool.map(one, range(WAVE)))
            if redis is not None:
                redis.stop()  # the breaker the wave opened lives in Redis, and Redis is gone
            before = paid_calls(client, fleet, faulty)
            followups = [one(WAVE + i) for i in range(3 if redis is not None else 1)]
            outcomes.extend(followups)
            row.followup_served_by = [backend for _, _, backend, _, _ in followups]
            row.followup_faulty_calls = paid_calls(client, fleet, faulty) - before
            metrics = client.get(f"{server.url}/metrics").text
    finally:
        if redis is not None:
            redis.close()
    row.failovers = metric_sum(metrics, "klein_failovers_total")
    row.double_spend = metric_sum(metrics, "klein_possible_double_spend_total")
    row.possibly_billed_usd = metric_sum(metrics, "klein_possibly_billed_usd_total")
    row.fal_unknown = metric_sum(metrics, "klein_upstream_attempts_total", backend="fal", outcome="unknown_outcome")
    # The server's shutdown drains the cancels dispatch and the deadline follow-ups send in the
    # background; ServerThread stops waiting for it after 10 s, so a loaded machine may still be
    # sending the last ones: read the emulators until no fal job is open or 20 s have passed.
    settle_by = time.monotonic() + 20
    while True:
        seen = {n: httpx.get(f"{fleet[n].base_url}/_admin/stats", timeout=5).json() for n in faulty}
        row.cancels = sum(stats["cancels"] for stats in seen.values())
        row.fal_open = seen["fal"]["jobs_open"] if "fal" in seen else 0
        if row.fault != "stuck" or not row.fal_open or time.monotonic() > settle_by:
            break
        time.sleep(0.2)
    for status, elapsed, backend, envelope_ok, possibly in outcomes:
        row.statuses.append(status)
        row.elapsed_s.append(elapsed)
        row.served_by.append(backend)
        row.envelopes_ok.append(envelope_ok)
        row.possibly_billed_answers += possibly
    row.problems = check_row(row)
    return row


# A 512x512 PNG cut in half: its header (and so its size) reads fine, its pixels do not.
_WHOLE_PNG = png_bytes(512, 512)
TRUNCATED_PNG = _WHOLE_PNG[: len(_WHOLE_PNG) // 2]


def check_truncated_upload(row: RowResult) -> list[str]:
    problems = []
    uploads = row.statuses[:WAVE]
    if any(s != 422 for s in uploads):
        problems.append(f"a truncated upload was not refused with 422: {uploads}")
    if any(s != 200 and not ok for s, ok in zip(uploads, row.envelopes_ok, strict=False)):
        problems.append("an error was not in the OpenAI envelope")
    if row.statuses[WAVE:] != [200] or row.followup_served_by != [ORDER[0]]:
        problems.append(f"the good request after the bad uploads was not served by the cheapest backend: {row.statuses[WAVE:]} / {row.followup_served_by}")
    return problems


def check_row(row: RowResult) -> list[str]:
    """What the issue promises for this row; an empty list when it holds."""
    if row.fault == "truncated_upload":
        return check_truncated_upload(row)
    problems = []
    if row.fault in UNKNOWN_OUTCOME_FAULTS and len(row.faulty) < len(ORDER) and row.possibly_billed_answers < 1:
        problems.append("an attempt of unknown outcome, never confirmed cancelled, was not reported as possibly billed")
    if len(row.faulty) < len(ORDER):
        if row.successes != row.requests:
            problems.append(f"{row.requests - row.successes} of {row.requests} failed with a healthy backend left: {row.statuses}")
        if any(b in row.faulty for b in row.served_by):
            problems.append(f"served by a faulty backend: {row.served_by}")
        if row.failovers < 1:
            problems.append("no failover was counted")
        if row.fault in UNKNOWN_OUTCOME_FAULTS and row.double_spend < 1:
            problems.append("moved on after an unknown outcome without counting a possible double spend")
        if row.fault in ROUTED_AROUND_AFTER_WAVE and row.followup_faulty_calls:
            problems.append(f"the follow-up request still called a faulty backend {row.followup_faulty_calls}x")
    else:
        if any(s not in (502, 503, 504) for s in row.statuses):
            problems.append(f"statuses {row.statuses}, want 502/503/504")
        if not all(row.envelopes_ok):
            problems.append("an error was not in the OpenAI envelope")
        limit = row.deadline_ms / 1000 + 1.0
        if max(row.elapsed_s) >= limit:
            problems.append(f"slowest answer {max(row.elapsed_s):.2f}s, over deadline + 1 s ({limit:.1f}s)")
    # A job stuck in fal's queue ends either dropped by fal itself (the gateway sends its
    # remaining time as X-Fal-Request-Timeout; FAILED, not billed) or, when its outcome
    # is left unknown, cancelled by the gateway; none is left to start and bill later.
    if row.fault == "stuck" and row.fal_open:
        problems.append(f"{row.fal_open} fal jobs left open ({row.fal_unknown:g} of unknown outcome, {row.cancels} cancelled)")
    if row.fault not in UNKNOWN_OUTCOME_FAULTS and row.double_spend:
        problems.append(f"{row.double_spend:g} possible double spends after faults whose outcome is known")
    return problems


def render(rows: list[RowResult]) -> str:
    head = f"{'fault':<16} {'position':<9} {'faulty':<18} {'deadline':>8} {'requests':>8} {'ok':>3} {'failovers':>9} {'dbl_spend':>9} {'poss_billed':>11} {'poss_usd':>9} {'cancels':>7} {'max_s':>6}  statuses / served by"
    lines = ["chaos table (backends local < fal < runflow at 512x512)", head, "-" * len(head)]
    for r in rows:
        served = ",".join(sorted(set(r.served_by)))
        codes = ",".join(str(s) for s in r.statuses)
        flag = "" if not r.problems else "  <-- " + "; ".join(r.problems)
        lines.append(
            f"{r.fault:<16} {r.position:<9} {'+'.join(r.faulty):<18} {r.deadline_ms:>6}ms {r.requests:>8} {r.successes:>3} "
            f"{r.failovers:>9g} {r.double_spend:>9g} {r.possibly_billed_answers:>11} {r.possibly_billed_usd:>9.5f} {r.cancels:>7} {max(r.elapsed_s):>6.2f}  {codes} / {served}{flag}"
        )
    lines.append(
        f"totals: {sum(r.requests for r in rows)} requests, {sum(r.successes for r in rows)} successes, "
        f"{sum(r.failovers for r in rows):g} failovers, {sum(r.double_spend for r in rows):g} possible double spends, "
        f"{sum(r.possibly_billed_answers for r in rows)} answers with possibly billed work "
        f"(${sum(r.possibly_billed_usd for r in rows):.5f}), {sum(r.cancels for r in rows)} provider jobs cancelled"
    )
    return "\n".join(lines)


def test_the_ladder_is_as_the_table_assumes(fleet: EmulatorFleet, chaos_config: Path) -> None:
    app = make_app(env=fleet.env(), config=chaos_config)
    with ServerThread(app) as server:
        quote = httpx.post(f"{server.url}/v1/images/quote", json=BODY, timeout=10).json()
    assert quote["order"] == ORDER


@pytest.mark.slow
def test_chaos_table(fleets: list[EmulatorFleet], chaos_config: Path, capsys: pytest.CaptureFixture[str], record_property) -> None:
    def lane(index: int) -> list[RowResult]:
        return [run_row(fleets[index], chaos_config, fault, position) for fault, position in LANES[index]]

    with ThreadPoolExecutor(len(LANES)) as pool:
        results = [r for rows in pool.map(lane, range(len(LANES))) for r in rows]
    order = {row: i for i, row in enumerate(ROWS)}
    rows = sorted(results, key=lambda r: order[(r.fault, r.position)])
    assert sorted((r.fault, r.position) for r in rows) == sorted(ROWS)
    table = render(rows)
    print(table)
    record_property("chaos_table", table)
    with capsys.disabled():
        print("\n" + table)
    bad = [f"{r.fault}/{r.position}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "chaos rows that broke a promise:\n" + "\n".join(bad)
