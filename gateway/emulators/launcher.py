"""Run every provider emulator with uvicorn, on free ports of 127.0.0.1.

In an event loop you already have:

    async with EmulatorFleet() as fleet:
        os.environ.update(fleet.env())       # point the gateway at the emulators
        ...

From synchronous code (the CLI's `serve --emulate`, or a test session),
the fleet runs in its own thread and event loop:

    fleet = EmulatorFleet.start_in_thread()
    try: ...
    finally: fleet.stop_thread()

Each emulator is a `uvicorn.Server` task (lifespan off, log level warning,
no access log) on a socket bound beforehand, so its port is known before it
serves. The servers never install signal handlers: the host process keeps
its own Ctrl-C handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.emulators.core import EmulatorApp
from gateway.emulators.empiriolabs import EmpirioLabsEmulator
from gateway.emulators.fal import FalEmulator
from gateway.emulators.knobs import EmulatorKnobs
from gateway.emulators.local import LocalEmulator
from gateway.emulators.replicate import ReplicateEmulator
from gateway.emulators.runflow import RunflowEmulator

PROVIDERS: dict[str, type[EmulatorApp]] = {
    "fal": FalEmulator,
    "replicate": ReplicateEmulator,
    "runflow": RunflowEmulator,
    "empiriolabs": EmpirioLabsEmulator,
    "local": LocalEmulator,
}
BASE_URL_ENV = {
    "fal": "KLEIN_FAL_BASE_URL",
    "replicate": "KLEIN_REPLICATE_BASE_URL",
    "runflow": "KLEIN_RUNFLOW_BASE_URL",
    "empiriolabs": "KLEIN_EMPIRIOLABS_BASE_URL",
    "local": "KLEIN_LOCAL_URL",
}
KEY_ENV = {"fal": "FAL_KEY", "replicate": "REPLICATE_API_TOKEN", "runflow": "RUNFLOW_API_KEY", "empiriolabs": "EMPIRIOLABS_API_KEY"}
# Key shapes like the real ones, so anything that checks a prefix is satisfied.
KEY_PREFIX = {"fal": "emu-fal-", "replicate": "r8_emu", "runflow": "rf_live_emu", "empiriolabs": "sk-empiriolabs-emu"}


def explicit_base_urls(environ: Mapping[str, str], providers: Iterable[str] = tuple(PROVIDERS)) -> dict[str, str]:
    """The providers whose base-URL variable the user set, with that URL.

    `serve --emulate` leaves these alone (no emulator, no key replaced), so the
    emulated hosted providers can run beside a real local GPU backend, or any
    one provider can be pointed at a rig of your own."""
    return {name: environ[BASE_URL_ENV[name]] for name in providers if environ.get(BASE_URL_ENV[name], "").strip()}


def build_app(provider: str, key: str | None = None, knobs: EmulatorKnobs | None = None, **kw: Any) -> EmulatorApp:
    """One provider's ASGI app (for uvicorn, or httpx.ASGITransport in tests)."""
    try:
        cls = PROVIDERS[provider]
    except KeyError:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}") from None
    return cls(key, knobs, **kw)


def new_key(provider: str) -> str | None:
    """A fresh random key for a hosted provider; None for local (no auth)."""
    prefix = KEY_PREFIX.get(provider)
    return None if prefix is None else prefix + secrets.token_hex(12)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn versions
        return None


@dataclass
class RunningEmulator:
    name: str
    base_url: str
    key: str  # "" where the emulator checks no key (local)
    app: EmulatorApp
    server: uvicorn.Server = field(repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def knobs(self) -> EmulatorKnobs:
        return self.app.knobs

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def set_knobs(self, patch: Mapping[str, Any]) -> EmulatorKnobs:
        """Merge `patch` into the knobs, as POST /_admin/knobs does."""
        self.app.set_knobs(self.app.knobs.merge(dict(patch)))
        return self.app.knobs


class EmulatorFleet:
    """Every emulator (or a chosen few), served on 127.0.0.1."""

    def __init__(
        self,
        providers: Iterable[str] = tuple(PROVIDERS),
        *,
        knobs: Mapping[str, EmulatorKnobs] | None = None,
        keys: Mapping[str, str | None] | None = None,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
    ) -> None:
        self.providers = list(providers)
        for name in self.providers:
            if name not in PROVIDERS:
                raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
        self._knobs = dict(knobs or {})
        self._keys = dict(keys or {})
        self.host = host
        self._ports = dict(ports or {})
        self.emulators: dict[str, RunningEmulator] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __getitem__(self, name: str) -> RunningEmulator:
        return self.emulators[name]

    # ---- in an event loop -------------------------------------------------------

    async def start(self, host: str | None = None, port: int = 0) -> EmulatorFleet:
        """Bind and serve every emulator. `port` 0 (default) picks free ports;
        any other number is the first of consecutive ports."""
        host = host or self.host
        self._loop = asyncio.get_running_loop()
        try:
            for offset, name in enumerate(self.providers):
                wanted = self._ports.get(name, port + offset if port else 0)
                await self._start_one(name, host, wanted)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start_one(self, name: str, host: str, port: int) -> None:
        key = self._keys[name] if name in self._keys else new_key(name)
        app = build_app(name, key, self._knobs.get(name))
        # proto IPPROTO_TCP, or asyncio skips TCP_NODELAY on accepted sockets
        # (Nagle + delayed ACK would then add ~40 ms to every response)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=2, timeout_keep_alive=30)
        server = _QuietServer(config)
        running = RunningEmulator(name, f"http://{host}:{bound}", key or "", app, server)
        running.task = asyncio.create_task(server.serve(sockets=[sock]), name=f"emulator-{name}")
        self.emulators[name] = running
        while not server.started:
            if running.task.done():
                running.task.result()  # raises the start-up error
                raise RuntimeError(f"emulator {name} stopped during start-up")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop every server; held requests are released at once."""
        for running in self.emulators.values():
            running.app.close()
            running.server.should_exit = True
        tasks = [r.task for r in self.emulators.values() if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> EmulatorFleet:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- what the gateway needs ------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment that points the gateway at the running emulators."""
        out: dict[str, str] = {}
        for name, running in self.emulators.items():
            out[BASE_URL_ENV[name]] = running.base_url
            if name in KEY_ENV:
                out[KEY_ENV[name]] = running.key
        return out

    def admin_urls(self) -> dict[str, str]:
        return {name: f"{r.base_url}/_admin" for name, r in self.emulators.items()}

    def reset(self) -> None:
        """Stats, jobs and knobs of every emulator back to how they started.
        Safe from any thread between requests (plain attribute swaps)."""
        for running in self.emulators.values():
            running.app.reset()

    # ---- in a thread of its own -------------------------------------------------

    @classmethod
    def start_in_thread(cls, providers: Iterable[str] = tuple(PROVIDERS), *, timeout: float = 30.0, **kw: Any) -> EmulatorFleet:
        """Start a fleet in a daemon thread with its own event loop; returns
        once every emulator is serving. Stop it with `stop_thread()`."""
        fleet = cls(providers, **kw)
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            fleet._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(fleet.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(fleet.stop())
                loop.close()

        fleet._thread = threading.Thread(target=main, name="klein-emulators", daemon=True)
        fleet._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("the emulators did not start in time")
        if failure:
            raise failure[0]
        return fleet

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a fleet started with `start_in_thread` and join its thread."""
        if self._thread is None or self._loop is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._thread = None

    def call_in_loop(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` in the fleet's loop (for knobs that touch asyncio objects)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)
