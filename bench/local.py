"""Throughput and latency of the local pipeline by bucket and batch size.

    python -m bench.local                                  # tiny random pipeline on CPU
    python -m bench.local --model /models/FLUX.2-klein-4B --device cuda \
        --sizes 512x512,1024x1024,1024x576 --batch-sizes 1,2,4,8

Each (size, batch size) gets one untimed call (new shapes warm up or compile),
then `--repeats` timed calls of the pipeline alone (no HTTP, no encoding).
The table shows the median latency of one call, images per second, seconds
per image, and the peak device memory on CUDA. The run stops starting new rows
once `--budget-s` is spent, so it ends in bounded time on any machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_backend.buckets import parse_sizes, size_label
from local_backend.config import Settings
from local_backend.pipeline import BatchCall, Generator, build_generator


@dataclass(frozen=True, slots=True)
class Row:
    size: str
    batch: int
    latency_s: float
    peak_bytes: int | None

    @property
    def images_per_s(self) -> float:
        return self.batch / self.latency_s

    @property
    def seconds_per_image(self) -> float:
        return self.latency_s / self.batch


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def measure(generator: Generator, size: tuple[int, int], batch: int, steps: int, repeats: int) -> Row:
    width, height = size
    call = BatchCall([f"a photo of a red fox, variant {k}" for k in range(batch)], list(range(batch)), width, height, steps)
    generator.generate(call)  # warm this shape
    reset_peak_memory()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        generator.generate(call)
        timings.append(time.perf_counter() - started)
    return Row(size_label(width, height), batch, statistics.median(timings), peak_memory())


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def table(rows: Sequence[Row]) -> str:
    lines = [f"{'bucket':>10} {'batch':>5} {'latency s':>10} {'images/s':>9} {'s/image':>8} {'peak GiB':>9}"]
    for row in rows:
        peak = "-" if row.peak_bytes is None else f"{row.peak_bytes / 2**30:.2f}"
        lines.append(f"{row.size:>10} {row.batch:>5} {row.latency_s:>10.4f} {row.images_per_s:>9.2f} {row.seconds_per_image:>8.4f} {peak:>9}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.local", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="local diffusers folder (default: the tiny random pipeline)")
    source.add_argument("--tiny", action="store_true", help="the tiny random pipeline (the default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--sizes", default="64x64,256x256,512x512")
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=120.0, help="start no new row after this many seconds")
    args = parser.parse_args(argv)

    settings = Settings(model_path=args.model, tiny=args.model is None, device=args.device, dtype=args.dtype, compile=args.compile)
    started = time.monotonic()
    generator = build_generator(settings)
    print(f"pipeline: {settings.model_name} on {generator.device}, loaded in {time.monotonic() - started:.1f}s, "
          f"{args.steps} steps, median of {args.repeats}")  # fmt: skip
    rows: list[Row] = []
    skipped = 0
    for size in parse_sizes(args.sizes):
        for batch in parse_ints(args.batch_sizes):
            if time.monotonic() - started > args.budget_s:
                skipped += 1
                continue
            rows.append(measure(generator, size, batch, args.steps, args.repeats))
    print(table(rows))
    if skipped:
        print(f"{skipped} rows skipped: the {args.budget_s:g}s budget was spent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
