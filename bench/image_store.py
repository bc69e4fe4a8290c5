"""What each image store costs per url answer: put (store the image and make
its URL) and get (what the file route does), side by side.

    python bench/image_store.py               # 1.5 MB and 70 KB images, 200 of each per store
    python bench/image_store.py --count 50

memory and filesystem (a temporary directory) run in this process; s3 runs
against moto's S3 server on loopback (pip install 'moto[server]'), so its
figures are a loopback HTTP round trip plus moto, not a real bucket's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.images import ImageStore, UrlSigner
from gateway.images.filesystem import FilesystemImageStore
from gateway.images.memory import MemoryImageStore

SIZES = {"70KB": 70_000, "1.5MB": 1_500_000}


async def measure(store: ImageStore, data: bytes, count: int) -> tuple[list[float], list[float]]:
    puts, gets = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        ref = await store.put(data, "image/png")
        await store.url(ref, "http://gw")
        t1 = time.perf_counter()
        got = await store.get(ref.name)
        t2 = time.perf_counter()
        assert got is not None and len(got.data) == len(data)
        puts.append(t1 - t0)
        gets.append(t2 - t1)
    return puts, gets


def stores(tmp: Path) -> dict[str, ImageStore]:
    common = {"ttl_s": 3600, "max_bytes": 1 << 40, "signer": UrlSigner()}
    out: dict[str, ImageStore] = {
        "memory": MemoryImageStore(**common),
        "filesystem": FilesystemImageStore(tmp / "images", **common),
    }
    try:
        import boto3
        from moto.server import ThreadedMotoServer

        from gateway.images.s3 import S3ImageStore, open_bucket
    except ImportError:
        print("s3: skipped (pip install 'moto[server]' boto3)")
        return out
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
    out["s3 (moto)"] = S3ImageStore(open_bucket("bench", endpoint_url=url, region="us-east-1", env=creds), **common)
    return out


def ms(values: list[float], q: float) -> str:
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:8.2f}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'store':<12} {'image':>6}  {'put p50 ms':>10} {'put p99 ms':>10}  {'get p50 ms':>10} {'get p99 ms':>10}")
        for name, store in stores(Path(tmp)).items():
            for label, size in SIZES.items():
                data = os.urandom(size)
                puts, gets = await measure(store, data, args.count)
                print(f"{name:<12} {label:>6}  {ms(puts, 0.5):>10} {ms(puts, 0.99):>10}  {ms(gets, 0.5):>10} {ms(gets, 0.99):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
