"""A batch scheduled by cost against its window: the local GPU filled, hosted backends paid only for the rest.

    python bench/batch_cost.py                    # 2,000 lines, a 0.1 MP/s GPU, 1 h / 6 h / 24 h; a few seconds
    python bench/batch_cost.py --lines 500 --rate 0.3 --seed 3
    python bench/batch_cost.py --every-tick       # call split on every tick, not only when its answer can change

A seeded batch of text-to-image lines (sizes 512x512 to 1536x1536, n 1 or 2) is
parsed by the gateway's own request parser and priced on every backend by the
real fleet built from the shipped providers.yaml and pricing/ (dummy
credentials, nothing is sent): the local backend's quote, and the cheapest
eligible hosted one (fal, replicate, runflow, empiriolabs). Then, for windows of
1 h, 6 h and 24 h, in simulated time (a discrete-event loop, no sleeping):

- the scheduler: the batch driver's loop as gateway/batches/runner.py runs it,
  ticking every 0.5 s: `split()` with LocalRate's estimate (its prior 30% above
  the true rate, so it has to learn), the spilled lines released at once to
  their hosted backend (latency drawn around its `expected_latency_s`), the
  local ones to a local backend with 2 slots (one on the GPU, one waiting),
  run one at a time at the true rate with +-10% per line;
- all lines on the cheapest hosted backend; all lines on the local GPU, in
  order (its finish time says whether it missed the window);
- the oracle: `oracle_usd()`, every price and the GPU's true rate known, no
  margin; the true rate is this batch's (all lines' work over their simulated
  GPU times), so the +-10% draws favour neither side.

Prints one table and writes the figures to bench/results/batch_cost-<UTC time>.json.
The driver calls `split` every tick; here a tick reuses the last answer when
nothing it depends on changed (no line finished) and the plan's slack has not
run out, which is the same answer (`--every-tick` checks that, at about 50x the time).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from gateway.batches.schedule import LineCost, LocalRate, margin_s, oracle_usd, split  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.dispatch.fleet import BackendFleet  # noqa: E402
from gateway.domain.job import ImageJob, JobKind  # noqa: E402
from gateway.http.parse import build_job, parse_body  # noqa: E402

RESULTS = REPO / "bench" / "results"
HOSTED = ("fal", "replicate", "runflow", "empiriolabs")
ENV = {"FAL_KEY": "bench", "REPLICATE_API_TOKEN": "bench", "RUNFLOW_API_KEY": "bench", "EMPIRIOLABS_API_KEY": "bench", "KLEIN_LOCAL_URL": "http://127.0.0.1:9"}
SIZES = {"512x512": 15, "768x768": 20, "1024x1024": 20, "1024x1536": 15, "1536x1024": 15, "1536x1536": 15}  # size: weight
NS = {1: 70, 2: 30}
WINDOWS = (("1 h", 3600.0), ("6 h", 6 * 3600.0), ("24 h", 24 * 3600.0))
JITTER = 0.10  # each local line takes its work / true rate, times 1 +- this
HOSTED_SIGMA = 0.35  # hosted latency: lognormal around the backend's expected_latency_s


@dataclass(frozen=True)
class Line:
    cost: LineCost
    images: int
    local_s: float  # how long the GPU really takes for it (true rate, jitter)
    hosted_s: float  # how long its hosted backend really takes


def build_fleet() -> BackendFleet:
    """The fleet from the shipped providers.yaml and pricing/, every backend enabled by dummy credentials."""
    config = load_config(REPO / "providers.yaml", REPO / "pricing", ENV)
    client = httpx.AsyncClient()  # never used: nothing here sends a request
    return BackendFleet(config, client, client)


def batch(fleet: BackendFleet, count: int, seed: int, true_rate: float) -> list[Line]:
    """`count` seeded lines, each priced on every backend as routing would price it."""
    rng = random.Random(seed)
    latency = {name: b.expected_latency_s or 2.0 for name, b in fleet.backends.items()}
    lines = []
    for i in range(count):
        body = {"prompt": f"line {i}", "size": rng.choices(list(SIZES), list(SIZES.values()))[0], "n": rng.choices(list(NS), list(NS.values()))[0]}
        job = build_job(parse_body(body), kind=JobKind.GENERATE, references=[], max_prompt_chars=4000, deadline_s=120.0, caller=None, known_backends=fleet.names, request_id=f"bench-{i}")
        cost = price(i, job, fleet)
        jitter = rng.uniform(1 - JITTER, 1 + JITTER)
        hosted_s = rng.lognormvariate(math.log(latency[cost.hosted_backend]), HOSTED_SIGMA) if cost.hosted_backend else math.inf
        lines.append(Line(cost, job.n, cost.work_mp / true_rate * jitter, hosted_s))
    return lines


def price(index: int, job: ImageJob, fleet: BackendFleet) -> LineCost:
    """The line's LineCost from the fleet's candidates: the local quote and the cheapest eligible hosted one."""
    local: Decimal | None = None
    work = 0.0
    best: tuple[Decimal, str] | None = None
    for c in fleet.candidates(job, {}):
        if not c.eligibility.ok or c.quote is None:
            continue
        served = c.served(job)
        if c.name == "local":
            local = c.quote.usd
            work = float(served.megapixels) * served.n * served.steps / 4
        elif c.name in HOSTED and (best is None or (c.quote.usd, c.name) < best):
            best = (c.quote.usd, c.name)
    if work == 0.0:
        work = float(job.megapixels) * job.n * job.steps / 4
    return LineCost(index, work, local, best[0] if best else None, best[1] if best else None)


# ---- the simulated driver ---------------------------------------------------------------


@dataclass
class Outcome:
    usd: Decimal = Decimal(0)
    finish_s: float = 0.0
    local: int = 0
    spilled: int = 0
    late: int = 0
    failed: int = 0  # lines no backend could take
    splits: int = 0  # split() calls
    learnt_mp_s: float = 0.0  # LocalRate's estimate at the end


def schedule(lines: Sequence[Line], *, window_s: float, prior_mp_s: float, tick_s: float, slots: int, every_tick: bool) -> Outcome:
    """The batch driver's loop in simulated time; returns what the batch cost and when it finished."""
    out = Outcome()
    margin = margin_s(window_s)
    rate = LocalRate(prior_mp_s)
    pending = {line.cost.line: line for line in lines}
    queue: deque[Line] = deque()  # released to the local backend, not on the GPU yet
    running: tuple[Line, float] | None = None  # on the GPU, and when it finishes
    queued_mp = 0.0  # work released to the local backend and not finished
    order: deque[int] = deque()  # the last plan's local lines, in run order
    valid_until = -math.inf  # the last answer holds until then unless a line finishes (only the clock moves: room shrinks only while the GPU idles or with seconds_left)
    changed = True
    finishes: list[float] = []

    def start(line: Line, at: float) -> tuple[Line, float]:
        return line, at + line.local_s

    t = 0.0
    while pending or queue or running is not None:
        while running is not None and running[1] <= t:  # the GPU's completions since the last tick
            done, at = running
            rate.completed(done.cost.work_mp, at)
            queued_mp -= done.cost.work_mp
            finishes.append(at)
            running = start(queue.popleft(), at) if queue else None
            if running is None:
                rate.busy(at, False)
            changed = True
        rate.busy(t, running is not None)  # the driver's tick: whether the GPU has lines in flight
        if pending:
            if changed or every_tick or t > valid_until:
                plan = split([line.cost for line in pending.values()], seconds_left=window_s - t, rate_mp_s=rate.mp_per_s, local_queued_mp=max(0.0, queued_mp - rate.partial_mp), margin_s=margin)
                out.splits += 1
                for i in plan.spill:
                    line = pending.pop(i)
                    if line.cost.hosted_usd is None:
                        out.failed += 1
                        continue
                    out.usd += line.cost.hosted_usd
                    out.spilled += 1
                    finishes.append(t + line.hosted_s)
                order = deque(plan.local)
                valid_until = window_s - margin - plan.forecast_finish_s
                changed = False
            while order and len(queue) + (running is not None) < slots:
                line = pending.pop(order.popleft())
                assert line.cost.local_usd is not None
                out.usd += line.cost.local_usd
                out.local += 1
                queue.append(line)
                queued_mp += line.cost.work_mp
        if running is None and queue:
            running = start(queue.popleft(), t)
            rate.busy(t, True)
        t += tick_s
    out.finish_s = max(finishes, default=0.0)
    out.late = sum(f > window_s for f in finishes)
    out.learnt_mp_s = rate.mp_per_s
    return out


def hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=2000, help="lines in the batch")
    ap.add_argument("--rate", type=float, default=0.1, help="the local GPU's true throughput, MP/s (0.1: about 10 s per 1 MP image, a small GPU)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prior", type=float, default=1.3, help="LocalRate's prior as a multiple of the true rate")
    ap.add_argument("--tick", type=float, default=0.5, help="seconds between the driver's ticks")
    ap.add_argument("--slots", type=int, default=2, help="local lines released at once (one on the GPU, the rest waiting)")
    ap.add_argument("--every-tick", action="store_true", help="call split on every tick, even when its answer cannot have changed")
    ap.add_argument("--json", type=Path, default=None, help="where to write the figures (default bench/results/batch_cost-<time>.json)")
    args = ap.parse_args(argv)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    clock = time.perf_counter()
    fleet = build_fleet()
    lines = batch(fleet, args.lines, args.seed, args.rate)
    costs = [line.cost for line in lines]
    work = sum(c.work_mp for c in costs)
    images = sum(line.images for line in lines)
    by_backend: dict[str, int] = {}
    for c in costs:
        by_backend[c.hosted_backend or "none"] = by_backend.get(c.hosted_backend or "none", 0) + 1
    all_hosted = sum((c.hosted_usd for c in costs if c.hosted_usd is not None), Decimal(0))
    all_local = sum((c.local_usd for c in costs if c.local_usd is not None), Decimal(0))
    all_local_s = sum(line.local_s for line in lines)
    true_rate = work / all_local_s  # the stated rate, as this batch's +-10% draws came out
    prior = args.rate * args.prior
    print(
        f"batch: {len(lines)} lines (seed {args.seed}), {images} images, {work:,.0f} MP of GPU work; cheapest hosted: "
        + ", ".join(f"{b} {n}" for b, n in sorted(by_backend.items(), key=lambda kv: -kv[1]))
    )
    print(
        f"local GPU: true rate {args.rate:g} MP/s (about {1 / args.rate:.0f} s per 1 MP image), +-{JITTER:.0%} per line ({true_rate:.5f} MP/s over this batch's draws, the oracle's),"
        f" {args.slots} slots; LocalRate prior {prior:.3g} MP/s; ticks every {args.tick:g} s; hosted latency lognormal around expected_latency_s"
    )
    print()
    rows = []
    header = "| window | margin | scheduler $ | scheduler finish | all-hosted $ | all-local $ | all-local finish | oracle $ | scheduler over oracle | saved vs all-hosted | local / spilled | late | rate learnt MP/s | split calls |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, window in WINDOWS:
        got = schedule(lines, window_s=window, prior_mp_s=prior, tick_s=args.tick, slots=args.slots, every_tick=args.every_tick)
        oracle = oracle_usd(costs, window_s=window, rate_mp_s=true_rate)
        over = got.usd / oracle - 1 if oracle else Decimal(0)
        saved = all_hosted - got.usd
        missed = "missed" if all_local_s > window else "in time"
        print(
            f"| {name} | {margin_s(window):.0f} s | {got.usd:.4f} | {hms(got.finish_s)} | {all_hosted:.4f} | {all_local:.4f} | {hms(all_local_s)} ({missed}) | {oracle:.4f} | {over:+.2%} |"
            f" {saved:.4f} ({saved / all_hosted:.1%}) | {got.local} / {got.spilled} | {got.late} | {got.learnt_mp_s:.4f} | {got.splits} |"
        )
        rows.append(
            {"window": name, "window_s": window, "margin_s": margin_s(window), "scheduler_usd": str(got.usd), "scheduler_finish_s": round(got.finish_s, 1),
             "all_hosted_usd": str(all_hosted), "all_local_usd": str(all_local), "all_local_finish_s": round(all_local_s, 1), "all_local_missed": all_local_s > window,
             "oracle_usd": str(oracle), "scheduler_over_oracle": float(over), "saved_vs_all_hosted_usd": str(saved), "saved_vs_all_hosted": float(saved / all_hosted),
             "local_lines": got.local, "spilled_lines": got.spilled, "late_lines": got.late, "failed_lines": got.failed, "rate_learnt_mp_s": got.learnt_mp_s, "split_calls": got.splits}
        )  # fmt: skip
    print()
    print("lines paid twice with one replica killed mid-batch: not simulated here; that figure comes from the real multi-process run in tests/test_batches_replicas.py")
    elapsed = time.perf_counter() - clock
    print(f"({elapsed:.1f} s)")
    out = args.json or RESULTS / f"batch_cost-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    conditions = {
        "lines": len(lines),
        "seed": args.seed,
        "work_mp": work,
        "true_rate_mp_s": args.rate,
        "drawn_rate_mp_s": true_rate,
        "prior_mp_s": prior,
        "jitter": JITTER,
        "tick_s": args.tick,
        "slots": args.slots,
        "every_tick": args.every_tick,
        "cheapest_hosted": by_backend,
    }
    out.write_text(json.dumps({"started": started, "elapsed_s": round(elapsed, 2), "conditions": conditions, "windows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    worst = max(row["scheduler_over_oracle"] for row in rows)
    return 1 if worst > 0.02 or any(row["late_lines"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
