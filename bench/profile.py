"""Where one Klein worker's CPU goes per request, sampled with py-spy.

    pip install py-spy                       # anywhere; it is a standalone sampler
    python bench/profile.py --payload url    # or b64; --py-spy PATH if not on PATH

Starts bench/compare.py's upstream (fixed 50 ms) and one `klein-gateway serve`
worker, drives it with the same load generator at concurrency 10, and samples
the worker with `py-spy record --format raw` (collapsed stacks) meanwhile. Prints
the functions with the largest inclusive share of samples, and the gateway's
CPU milliseconds per request over the same window, so that a change can be
judged by where the time moved, not only by how much.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import REPO, start_klein, start_upstream, target_for  # noqa: E402 - after bench/ is put on sys.path
from overhead import closed_loop, raise_open_file_limit  # noqa: E402 - after bench/ is put on sys.path


def summarise(collapsed: Path, top: int) -> str:
    """Inclusive share per function (each frame counted once per stack) from py-spy's raw output."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        for frame in set(stack.split(";")):
            inclusive[frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in frame else frame] += n
    rows = [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return f"{total} samples\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payload", choices=["url", "b64"], default="url")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--source", type=Path, default=REPO)
    p.add_argument("--out", type=Path, default=None, help="keep the collapsed stacks here")
    args = p.parse_args(argv)
    raise_open_file_limit(8192)
    workdir = Path(tempfile.mkdtemp(prefix="klein-profile-"))
    upstream, upstream_url = start_upstream(workdir, 50.0, "profile")
    klein = None
    try:
        klein, url = start_klein(args.source.resolve(), workdir, upstream_url, "profile")
        target = target_for("klein", url, args.payload)
        asyncio.run(closed_loop(target, args.concurrency, 2.0, 10_000, stagger_s=0.05))  # warm
        out = args.out or workdir / f"{args.payload}.txt"
        spy = subprocess.Popen(
            [args.py_spy, "record", "--pid", str(klein.pid), "--format", "raw", "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--nonblocking", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cpu0 = klein.cpu_seconds()
        latencies, errors, elapsed = asyncio.run(closed_loop(target, args.concurrency, args.seconds, 100_000, stagger_s=0.05))
        cpu = klein.cpu_seconds() - cpu0
        spy.wait(60)
        print(f"{args.payload} c={args.concurrency}: {len(latencies) / elapsed:.1f} req/s, {1000 * cpu / max(len(latencies), 1):.2f} ms gateway CPU per request, errors {sum(errors.values())}")
        print(summarise(out, args.top))
        print(f"collapsed stacks: {out}")
    finally:
        if klein:
            klein.stop()
        upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
