"""`python -m tests.emulators`: run the emulator fleet standalone.

Prints the environment that points a gateway (or your own client) at it,
then serves until interrupted. `--port N` uses N, N+1, ... instead of free
ports; `--realistic` turns on latencies like the real providers'.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys

from tests.emulators.knobs import EmulatorKnobs
from tests.emulators.launcher import PROVIDERS, EmulatorFleet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.emulators", description="Serve the provider emulators on 127.0.0.1.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first port (default: free ports)")
    parser.add_argument("--only", default=",".join(PROVIDERS), help="comma-separated providers (default: all)")
    parser.add_argument("--realistic", action="store_true", help="latencies like the real providers'")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    providers = [p.strip() for p in args.only.split(",") if p.strip()]
    knobs = {p: EmulatorKnobs.realistic(p) for p in providers} if args.realistic else None
    fleet = EmulatorFleet(providers, knobs=knobs, host=args.host)
    await fleet.start(port=args.port)
    try:
        for name, value in fleet.env().items():
            print(f"export {name}={shlex.quote(value)}")
        for name, url in fleet.admin_urls().items():
            print(f"# {name} admin: {url}/knobs  {url}/stats", file=sys.stderr)
        sys.stdout.flush()
        await asyncio.Event().wait()
    finally:
        await fleet.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        asyncio.run(serve(parse_args(argv)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
