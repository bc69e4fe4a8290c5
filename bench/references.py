"""What checking a reference image on arrival costs: header only vs a full decode.

The gateway decodes every uploaded or inlined reference in full (so a truncated
file is the caller's 422, not a backend's failure), in a worker thread. This
prints, per format and size, side by side and as the median of a few runs: the
time to read the header, to decode the pixels, the header checks every
reference gets (`check_image_bytes`) and the pixel check (`check_decodes`).

    python bench/references.py            # 1, 4 and 16.7 MP; about 30 s
    python bench/references.py --quick    # 1 MP only
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from collections.abc import Callable
from functools import partial

from PIL import Image

from gateway.dispatch.references import check_decodes, check_image_bytes

SIZES = {"1 MP": (1024, 1024), "4 MP": (2048, 2048), "16.7 MP": (4096, 4096)}
FORMATS = ("PNG", "JPEG", "WEBP")


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photograph, not like a flat fill."""
    rng = random.Random(1)
    base = Image.linear_gradient("L").resize((width, height))
    noise = Image.frombytes("L", (width, height), bytes(rng.getrandbits(5) for _ in range(width * height)))
    return Image.merge("RGB", (base, noise, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def encoded(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return out.getvalue()


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def header(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 MP only")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sizes = {"1 MP": SIZES["1 MP"]} if args.quick else SIZES
    print(f"{'image':18s} {'bytes':>11s} {'header ms':>10s} {'decode ms':>10s} {'header chk':>10s} {'pixel chk':>10s}")
    for label, (w, h) in sizes.items():
        img = photo_like(w, h)
        for fmt in FORMATS:
            data = encoded(img, fmt)
            figures = [median_ms(partial(fn, data), args.runs) for fn in (header, decode, check_image_bytes, check_decodes)]
            print(f"{fmt + ' ' + label:18s} {len(data):11,d} " + " ".join(f"{ms:10.2f}" for ms in figures))


if __name__ == "__main__":
    main()
