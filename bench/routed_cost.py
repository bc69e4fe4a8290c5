"""What routing saves: a mixed workload priced by the gateway's router and by an independent oracle.

The workload (seeded, at least 200 jobs) mixes text-to-image and edits: exact
sizes, aspect ratios, fal presets and `auto`; n from 1 to 4; steps; edits with
1 to 4 references, uploaded or given as URLs. Each job is parsed by the
gateway's own request parser (so it carries the same size intent a caller's
request would) and routed by the real fleet built from the shipped
providers.yaml and pricing/: the chosen backend's quote is the routed cost.

The oracle is a second implementation, sharing no code with gateway.routing.pricing,
gateway.domain.capabilities or gateway.domain.native_sizes: its own copy of every backend's
price rule, limits and native sizes. For each job it finds the cheapest
backend that can do it. Printed side by side, per health scenario:

- routed total, oracle minimum, fal-only total, and a LiteLLM-style "first
  deployment" total (the first backend in providers.yaml order that can take
  the job and is up, whatever its price);
- the share of jobs where routing missed the oracle's minimum, with the
  reason for each miss. A miss is expected only when the cheapest backend was
  down; any other miss is a defect.

    python bench/routed_cost.py                   # 240 jobs, hosted backends, public base URL set
    python bench/routed_cost.py --jobs 1000 --outage-rate 0.2
    python bench/routed_cost.py --with-local      # add the local GPU (cheapest for almost everything)
    python bench/routed_cost.py --no-public-url   # uploads cannot reach EmpirioLabs
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from gateway.config import load_config  # noqa: E402
from gateway.dispatch.fleet import BackendFleet  # noqa: E402
from gateway.dispatch.references import check_image_bytes  # noqa: E402
from gateway.dispatch.upload_links import UploadLinks  # noqa: E402
from gateway.domain.job import ImageJob, JobKind, ReferenceImage  # noqa: E402
from gateway.health.tracker import BreakerState  # noqa: E402
from gateway.health.view import HealthView  # noqa: E402
from gateway.http.parse import build_job, parse_body  # noqa: E402
from gateway.images.memory import MemoryImageStore  # noqa: E402
from gateway.images.signing import UrlSigner  # noqa: E402
from gateway.routing.plan import plan  # noqa: E402

HOSTED_ENV = {
    "FAL_KEY": "bench-fal:key",
    "REPLICATE_API_TOKEN": "r8_bench",
    "RUNFLOW_API_KEY": "rf_bench",
    "EMPIRIOLABS_API_KEY": "sk-empiriolabs-bench",
}
PUBLIC_BASE_URL = "https://gateway.example.com"
CONFIG_ORDER = ("fal", "replicate", "runflow", "empiriolabs", "local")  # providers.yaml order
MICRO = Decimal("0.00000001")
MP = Decimal(1_000_000)

# ---- the workload ---------------------------------------------------------------------

EXACT_SIZES = ["1024x1024", "1024x768", "768x1024", "1344x768", "1360x768", "512x512", "1536x1024", "2048x2048", "1152x896", "1216x832", "1024x576"]
ASPECTS = ["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9", "9:21", "2:1"]
PRESETS = ["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
UPLOAD_SIZES = [(1024, 1024), (1024, 768), (768, 1024), (512, 512), (1536, 1024), (1000, 1000)]


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(out, "PNG")
    return out.getvalue()


def workload(count: int, seed: int = 7) -> list[tuple[dict[str, Any], list[ReferenceImage]]]:
    """(request body, references) pairs; the same seed gives the same jobs."""
    rng = random.Random(seed)
    uploads = {size: check_image_bytes(_png(*size)) for size in UPLOAD_SIZES}
    jobs = []
    for i in range(count):
        body: dict[str, Any] = {"prompt": f"job {i}", "n": rng.choices([1, 2, 3, 4], [60, 20, 10, 10])[0]}
        body["num_inference_steps"] = rng.choices([4, 2, 8, 12, 28], [70, 8, 10, 7, 5])[0]
        mode = rng.choices(["exact", "aspect", "preset", "auto"], [40, 35, 10, 15])[0]
        if mode == "exact":
            body["size"] = rng.choice(EXACT_SIZES)
        elif mode == "aspect":
            body["aspect_ratio"] = rng.choice(ASPECTS)
        elif mode == "preset":
            body["image_size"] = rng.choice(PRESETS)
        refs: list[ReferenceImage] = []
        if rng.random() < 0.4:
            for k in range(rng.randint(1, 4)):
                if rng.random() < 0.6:
                    refs.append(uploads[rng.choice(UPLOAD_SIZES)])
                else:
                    refs.append(ReferenceImage(content_type="application/octet-stream", url=f"https://images.example.com/{i}-{k}.png"))
        jobs.append((body, refs))
    return jobs


def parse_jobs(fleet: BackendFleet, pairs: Iterable[tuple[dict[str, Any], list[ReferenceImage]]]) -> list[ImageJob]:
    return [
        build_job(parse_body(body), kind=JobKind.EDIT if refs else JobKind.GENERATE, references=refs, max_prompt_chars=4000,
                  deadline_s=120.0, caller=None, known_backends=fleet.names, request_id=f"bench-{i}")
        for i, (body, refs) in enumerate(pairs)
    ]  # fmt: skip


# ---- the oracle: every backend's rule, written out again -------------------------------------

# Replicate's klein makes only these sizes (1 MP tier, docs/providers/replicate.md#sizes).
ORACLE_REPLICATE_SIZES = {(1024, 1024), (1365, 768), (768, 1365), (1254, 836), (836, 1254), (1183, 887), (887, 1182), (1145, 916), (916, 1145), (1563, 670), (670, 1564)}
RATIO_TOLERANCE = 0.01
PIXEL_TOLERANCE = 0.10


@dataclass(frozen=True)
class Offer:
    backend: str
    usd: Decimal
    size: tuple[int, int]


def _money(value: Decimal) -> Decimal:
    return value.quantize(MICRO, rounding=ROUND_HALF_UP)


def _on_grid(w: int, h: int, lo: int, hi: int, max_pixels: int) -> bool:
    return w % 16 == 0 and h % 16 == 0 and lo <= w <= hi and lo <= h <= hi and w * h <= max_pixels


def _nearest(job: ImageJob, sizes: set[tuple[int, int]]) -> tuple[int, int] | None:
    """The size a fixed-size backend makes for the job, or None if it cannot."""
    asked = (job.width, job.height)
    if asked in sizes:
        return asked
    if job.size_intent.exact:
        return None
    want = job.size_intent.ratio[0] / job.size_intent.ratio[1] if job.size_intent.ratio else job.width / job.height
    pixels = job.width * job.height
    near = [(abs(w / h - want), abs(w * h - pixels), (w, h)) for w, h in sizes if abs(w / h - want) <= RATIO_TOLERANCE * want and abs(w * h - pixels) <= PIXEL_TOLERANCE * pixels]
    return min(near)[2] if near else None


def oracle_offers(job: ImageJob, *, uploads_reachable: bool, with_local: bool) -> list[Offer]:
    """Every backend that can do the job exactly as asked, with what it costs."""
    n, k, steps = job.n, len(job.references), job.steps
    edit = job.kind is JobKind.EDIT
    has_upload = any(ref.url is None for ref in job.references)
    offers = []

    def mp(size: tuple[int, int]) -> Decimal:
        return Decimal(size[0] * size[1]) / MP

    size = (job.width, job.height)
    # fal: any 16-pixel size to 4 MP; $0.005/MP, edits $0.010/MP of outputs plus 1 MP per reference.
    if _on_grid(*size, 64, 2048, 2048 * 2048) and n <= 4 and 1 <= steps <= 50:
        usd = Decimal("0.010") * (n * mp(size) + k) if edit else Decimal("0.005") * n * mp(size)
        offers.append(Offer("fal", _money(usd), size))
    # Replicate: its own sizes, always 4 steps; $0.001/MP of outputs plus 1 MP per reference.
    made = _nearest(job, ORACLE_REPLICATE_SIZES)
    if made is not None and n <= 4 and steps == 4:
        usd = Decimal("0.001") * (n * mp(made) + (k if edit else 0))
        offers.append(Offer("replicate", _money(usd), made))
    # Runflow: t2i any 16-pixel size, $0.014 first MP + $0.001 per further MP per image;
    # edits only 1024x1024, one image, at most 25 steps, $0.005 flat per image.
    if edit:
        made = _nearest(job, {(1024, 1024)})
        if made is not None and n == 1 and 1 <= steps <= 25:
            offers.append(Offer("runflow", _money(Decimal("0.005") * n), made))
    elif _on_grid(*size, 64, 2048, 2048 * 2048) and n <= 4 and 1 <= steps <= 50:
        usd = n * (Decimal("0.014") + max(Decimal(0), mp(size) - 1) * Decimal("0.001"))
        offers.append(Offer("runflow", _money(usd), size))
    # EmpirioLabs: sides 256-2048, at most 1,048,576 pixels, steps 1-12, references as URLs; $0.0085 per image.
    if _on_grid(*size, 256, 2048, 1_048_576) and n <= 4 and 1 <= steps <= 12 and (uploads_reachable or not has_upload):
        offers.append(Offer("empiriolabs", _money(Decimal("0.0085") * n), size))
    # Local GPU: $2.50/h x 0.57 s per image at 1 MP and 4 steps, scaled by MP and steps.
    if with_local and _on_grid(*size, 64, 2048, 2048 * 2048) and n <= 4 and 1 <= steps <= 50:
        usd = n * Decimal("2.50") / 3600 * Decimal("0.57") * mp(size) * Decimal(steps) / 4
        offers.append(Offer("local", _money(usd), size))
    return offers


# ---- routing vs the oracle ---------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    jobs: int = 0
    routed: Decimal = Decimal(0)
    oracle: Decimal = Decimal(0)
    fal_only: Decimal = Decimal(0)
    fal_unable: int = 0
    first_deployment: Decimal = Decimal(0)
    unrouted: int = 0  # jobs no backend was routed for (every capable one down); not in `routed`
    misses: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)  # misses not explained by an outage
    by_backend: dict[str, int] = field(default_factory=dict)

    @property
    def missed_share(self) -> float:
        return len(self.misses) / self.jobs if self.jobs else 0.0


def build_fleet(*, with_local: bool, public_url: bool, native_sizes: bool = True) -> BackendFleet:
    """The fleet from the shipped providers.yaml and pricing/. `native_sizes`
    False (zero tolerance) and `public_url` False give the routing rules that
    held before shape-only requests and lent upload URLs existed."""
    env = dict(HOSTED_ENV) | ({"KLEIN_LOCAL_URL": "http://127.0.0.1:9"} if with_local else {})
    config = load_config(REPO / "providers.yaml", REPO / "pricing", env)
    config.settings.public_base_url = PUBLIC_BASE_URL if public_url else None
    if not native_sizes:
        config.settings.native_size_ratio_tolerance = config.settings.native_size_pixel_tolerance = 0.0
    client = httpx.AsyncClient()  # never used: nothing here sends a request
    fleet = BackendFleet(config, client, client)
    fleet.uploads = UploadLinks(MemoryImageStore(ttl_s=60, max_bytes=1, signer=UrlSigner()), config.settings)
    return fleet


def outages(jobs: int, names: Sequence[str], rate: float, seed: int) -> list[frozenset[str]]:
    rng = random.Random(seed)
    return [frozenset(name for name in names if rng.random() < rate) for _ in range(jobs)]


def routed_total(fleet: BackendFleet, jobs: Sequence[ImageJob]) -> tuple[Decimal, int]:
    """What routing spends on the jobs with every backend up, and how many it cannot route."""
    total, refused = Decimal(0), 0
    views = {b: HealthView() for b in fleet.backends}
    for job in jobs:
        chosen = plan(job, fleet.candidates(job, views)).chosen
        if chosen is None or chosen.quote is None:
            refused += 1
        else:
            total += chosen.quote.usd
    return total, refused


def run(fleet: BackendFleet, jobs: Sequence[ImageJob], down: Sequence[frozenset[str]], name: str, *, with_local: bool) -> Scenario:
    """Route every job with the given backends down and compare with the oracle."""
    out = Scenario(name)
    reachable = fleet.uploads is not None and fleet.uploads.available
    for i, (job, unavailable) in enumerate(zip(jobs, down, strict=True)):
        views = {b: HealthView(state=BreakerState.OPEN) if b in unavailable else HealthView() for b in fleet.backends}
        chosen = plan(job, fleet.candidates(job, views)).chosen
        offers = oracle_offers(job, uploads_reachable=reachable, with_local=with_local)
        out.jobs += 1
        if not offers:
            if chosen is not None:
                out.defects.append(f"job {i}: routed to {chosen.name}, but the oracle says no backend can do it")
            continue
        best = min(offer.usd for offer in offers)
        cheapest = sorted(o.backend for o in offers if o.usd == best)
        out.oracle += best
        fal = next((o for o in offers if o.backend == "fal"), None)
        if fal is None:
            out.fal_unable += 1
        else:
            out.fal_only += fal.usd
        first = next((o for b in CONFIG_ORDER for o in offers if o.backend == b and b not in unavailable), None)
        out.first_deployment += first.usd if first is not None else Decimal(0)
        down_text = f"; down: {', '.join(sorted(unavailable))}" if unavailable else ""
        label = f"job {i} ({job.kind.value} {job.size}{'' if job.size_intent.exact else ' flexible'}, n={job.n}, steps={job.steps}, refs={len(job.references)}{down_text})"
        if chosen is None or chosen.quote is None:
            reason = f"{label}: no backend was routed; the oracle's cheapest is {', '.join(cheapest)} at ${best}"
            out.unrouted += 1
            out.misses.append(reason)
            if not set(cheapest) <= unavailable:
                out.defects.append(reason)
            continue
        routed = chosen.quote.usd
        out.routed += routed
        out.by_backend[chosen.name] = out.by_backend.get(chosen.name, 0) + 1
        mine = next((o for o in offers if o.backend == chosen.name), None)
        if mine is None or mine.usd != routed or mine.size != (chosen.served(job).width, chosen.served(job).height):
            out.defects.append(f"{label}: routed to {chosen.name} at ${routed} {chosen.served(job).size}; the oracle prices it {mine}")
        if routed != best:
            if set(cheapest) <= unavailable:
                out.misses.append(f"{label}: cheapest {', '.join(cheapest)} (${best}) was down; routed to {chosen.name} at ${routed}")
            else:
                reason = f"{label}: routed to {chosen.name} at ${routed}, but {', '.join(cheapest)} was up at ${best}"
                out.misses.append(reason)
                out.defects.append(reason)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=240, help="workload size (at least 200 for the published figures)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--outage-rate", type=float, default=0.1, help="chance each backend is down for each job, in the outage scenario")
    ap.add_argument("--with-local", action="store_true", help="add the local GPU backend")
    ap.add_argument("--no-public-url", action="store_true", help="no public base URL: uploads cannot be lent a URL")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--show-misses", type=int, default=20, help="print at most this many misses per scenario")
    args = ap.parse_args(argv)

    fleet = build_fleet(with_local=args.with_local, public_url=not args.no_public_url)
    jobs = parse_jobs(fleet, workload(args.jobs, args.seed))
    names = sorted(fleet.backends)
    scenarios = [
        run(fleet, jobs, [frozenset()] * len(jobs), "all healthy", with_local=args.with_local),
        run(fleet, jobs, outages(len(jobs), names, args.outage_rate, args.seed), f"outages ({args.outage_rate:.0%} per backend per job)", with_local=args.with_local),
    ]
    kinds = {"edits": sum(j.kind is JobKind.EDIT for j in jobs), "flexible sizes": sum(not j.size_intent.exact for j in jobs),
             "upload edits": sum(any(r.url is None for r in j.references) for j in jobs), "images": sum(j.n for j in jobs)}  # fmt: skip
    print(f"workload: {len(jobs)} jobs (seed {args.seed}); " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    print(f"backends: {', '.join(names)}; public base URL {'set' if not args.no_public_url else 'not set'}")
    print()
    print("| scenario | jobs | routed $ | oracle min $ | fal-only $ | first deployment $ | routed vs fal-only | missed | unrouted | defects | routed to |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in scenarios:
        saving = 1 - s.routed / s.fal_only if s.fal_only else Decimal(0)
        spread = ", ".join(f"{b} {c}" for b, c in sorted(s.by_backend.items(), key=lambda kv: -kv[1]))
        print(
            f"| {s.name} | {s.jobs} | {s.routed:.6f} | {s.oracle:.6f} | {s.fal_only:.6f} | {s.first_deployment:.6f} | {saving:.1%} cheaper | {s.missed_share:.1%} ({len(s.misses)}) | {s.unrouted} | {len(s.defects)} | {spread} |"
        )
    before, refused = routed_total(build_fleet(with_local=args.with_local, public_url=False, native_sizes=False), jobs)
    healthy = scenarios[0]
    print(
        f"\nall healthy, routed by the earlier rules (exact sizes only, uploads never lent a URL): ${before:.6f}"
        f" ({1 - before / healthy.fal_only:.1%} cheaper than fal-only{f'; {refused} jobs unroutable' if refused else ''});"
        f" native sizes and lent URLs save a further {1 - healthy.routed / before:.1%}"
    )
    if any(s.fal_unable for s in scenarios):
        print(f"\nfal cannot do {scenarios[0].fal_unable} of the jobs; the fal-only total leaves them out.")
    for s in scenarios:
        if s.misses or s.defects:
            print(f"\n{s.name}: misses")
            for line in s.misses[: args.show_misses]:
                print(f"  - {line}")
            if len(s.misses) > args.show_misses:
                print(f"  ... and {len(s.misses) - args.show_misses} more")
            for line in s.defects:
                print(f"  DEFECT {line}")
    if args.json:
        args.json.write_text(json.dumps([{k: str(v) if isinstance(v, Decimal) else v for k, v in vars(s).items()} for s in scenarios], indent=2))
    return 1 if any(s.defects for s in scenarios) else 0


if __name__ == "__main__":
    raise SystemExit(main())
