"""The gateway's own CPU per request, with no network: the ASGI app called directly.

    python bench/ownpath.py                    # CPU microseconds per request, this checkout
    python bench/ownpath.py --source DIR       # another checkout (run it from there: imports follow PYTHONPATH)
    python bench/ownpath.py --profile 20       # and the 20 functions with the most own time (cProfile)

The real app (shipped providers.yaml, EmpirioLabs only, the memory store, the
JSON request log to /dev/null) gets POST /v1/images/generations for a
1024x1024 `url` image, answered by a stand-in adapter whose URL reports its
size (so no Range request): no uvicorn, no HTTP client, no upstream. What is
left is litestar, the gateway's parsing, routing, pricing, dispatch, health,
billing, metrics, answer and log line: the part of a request's CPU that
bench/profile.py cannot separate from httpx's. Plain asyncio (not uvloop).
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # bench/profile.py would stand in for the standard library's profile, which cProfile imports

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import time
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BODY = b'{"model":"flux-2-klein-4b","prompt":"a lighthouse at dusk","size":"1024x1024","response_format":"url"}'


def build_app() -> Any:
    from gateway.observability.logs import configure_logging
    from gateway.providers.base import GeneratedImage, ProviderResult
    from tests.gateway_support import FakeAdapter, install_fakes, make_app

    configure_logging(stream=open(os.devnull, "w"), secrets=["sk-empiriolabs-bench"])  # noqa: SIM115 - for the process's life
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = make_app({"EMPIRIOLABS_API_KEY": "sk-empiriolabs-bench", "KLEIN_USAGE_LEDGER": ":memory:"})

    class SizedUrl(FakeAdapter):
        async def generate(self, job: Any, deadline: float) -> Any:
            return ProviderResult(images=[GeneratedImage(url="https://cdn.test/x.png", content_type="image/png", width=job.width, height=job.height)], job_id="job-1")

    install_fakes(app, {"empiriolabs": SizedUrl("empiriolabs")})
    return app


async def one(app: Any) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/images/generations",
        "raw_path": b"/v1/images/generations",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5555),
        "state": {},
    }
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": BODY, "more_body": False}]
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await never.wait()  # the caller stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0].get("status") != 200:
        raise RuntimeError(f"the request failed: {sent}")


async def run(app: Any, requests: int, profiler: cProfile.Profile | None) -> float:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put))
    await outbox.get()
    for _ in range(300):  # warm
        await one(app)
    cpu0 = time.process_time()
    if profiler is not None:
        profiler.enable()
    for _ in range(requests):
        await one(app)
    if profiler is not None:
        profiler.disable()
    cpu = time.process_time() - cpu0
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan
    return cpu / requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3, help="runs; the median is reported (default 3)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="one extra profiled run; print its N functions with the most own time")
    p.add_argument("--source", type=Path, default=REPO)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.source.resolve()))
    os.chdir(args.source)
    runs = sorted(asyncio.run(run(build_app(), args.requests, None)) for _ in range(args.repeat))  # a fresh app each run
    print(f"own path: {1e6 * runs[len(runs) // 2]:.0f} us CPU per request (median of {args.repeat} runs of {args.requests}; runs {', '.join(f'{1e6 * r:.0f}' for r in runs)})")
    if args.profile:
        profiler = cProfile.Profile()
        asyncio.run(run(build_app(), args.requests, profiler))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
