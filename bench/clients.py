"""httpx against leaner HTTP clients, on the gateway's hot path: CPU per upstream call.

    python bench/clients.py            # about a minute
    python bench/clients.py --help

Each client makes the call the EmpirioLabs adapter makes (POST a small JSON
body, read the whole answer, decode its JSON) against compare.py's upstream
(its own process, fixed delay), at a fixed concurrency over one shared
client with keep-alive connections, as the gateway does. What is compared is
this process's CPU time per call (`time.process_time`), which a shared
machine disturbs far less than wall-clock rates, for a small answer (a URL)
and for 1.1 MB of base64. Clients: httpx.AsyncClient, the gateway's own wire
(`gateway/net/aiohttp_wire.py`: aiohttp with no client layer above it, what
adapters call), httpcore's AsyncConnectionPool (httpx without its client
layer), and aiohttp's ClientSession used directly; each decodes with msgspec,
as the adapters do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from compare import start_upstream  # noqa: E402 - after bench/ is put on sys.path

Call = Callable[[], Awaitable[object]]


async def run(call: Call, concurrency: int, total: int) -> tuple[float, float]:
    """(CPU ms per call, calls per second) for `total` calls by `concurrency` workers."""
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm the connections
    left = total
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu0) * 1000 / total, total / (time.perf_counter() - t0)


async def measure(url: str, payload: str, concurrency: int, total: int) -> dict[str, tuple[float, float]]:
    import aiohttp
    import httpcore
    import httpx
    import msgspec

    from gateway.net.aiohttp_wire import AiohttpWire
    from gateway.net.wire import WireTimeout

    body = json.dumps({"model": "flux-2-klein-4b", "prompt": "a lighthouse", "size": "1024x1024", "response_format": "b64_json" if payload == "b64" else "url"}).encode()
    headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
    decode = msgspec.json.Decoder().decode
    out: dict[str, tuple[float, float]] = {}

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200, max_keepalive_connections=200)) as client:

        async def via_httpx() -> object:
            resp = await client.post(url, content=body, headers=headers, timeout=30)
            return decode(resp.content)

        out["httpx"] = await run(via_httpx, concurrency, total)

    wire = AiohttpWire(200)
    timeout = WireTimeout.of(30)

    async def via_wire() -> object:
        resp = await wire.send("POST", url, headers=headers, content=body, timeout=timeout)
        return decode(resp.content)

    out["the gateway's wire (aiohttp, no client layer)"] = await run(via_wire, concurrency, total)
    await wire.aclose()

    async with httpcore.AsyncConnectionPool(max_connections=200) as pool:
        hc_headers = [(k.encode(), v.encode()) for k, v in headers.items()]

        async def via_httpcore() -> object:
            resp = await pool.request("POST", url, headers=hc_headers, content=body)
            return decode(resp.content)

        out["httpcore"] = await run(via_httpcore, concurrency, total)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:

        async def via_aiohttp() -> object:
            async with session.post(url, data=body, headers=headers) as resp:
                return decode(await resp.read())

        out["aiohttp"] = await run(via_aiohttp, concurrency, total)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--requests", type=int, default=600, help="calls per client and payload (default 600)")
    p.add_argument("--repeat", type=int, default=3, help="runs; medians are reported (default 3)")
    p.add_argument("--delay-ms", type=float, default=5.0, help="the upstream's fixed delay (default 5)")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()  # as uvicorn runs the gateway
    except ImportError:
        pass
    upstream, base = start_upstream(Path(tempfile.mkdtemp(prefix="klein-clients-")), args.delay_ms, "clients")
    try:
        print(f"upstream delay {args.delay_ms:g} ms, concurrency {args.concurrency}, {args.requests} calls per cell, medians of {args.repeat}")
        print("| payload | client | CPU ms per call | calls/s |")
        print("|---|---|---|---|")
        for payload in ("url", "b64"):
            runs = [asyncio.run(measure(base + "/v1/images/generations", payload, args.concurrency, args.requests)) for _ in range(args.repeat)]
            for name in runs[0]:
                cpu = statistics.median(r[name][0] for r in runs)
                rate = statistics.median(r[name][1] for r in runs)
                print(f"| {payload} | {name} | {cpu:.3f} | {rate:.0f} |", flush=True)
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
