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

Which providers can be emulated, and under which variables the gateway finds
them, comes from the provider registry: every adapter with an `emulator`
hook (`gateway.providers.base.EmulatorHook`) is served, keyed by its kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.providers import adapter_class, kinds
from gateway.providers.base import Adapter, EmulatorHook
from tests.emulators.core import EmulatorApp
from tests.emulators.knobs import EmulatorKnobs


class EmulatedProviders(Mapping[str, type[EmulatorApp]]):
    """Kind -> emulator app class for every registered adapter with an
    emulator hook. Read live, so a provider registered later is served too;
    an app's module is imported only when it is looked up."""

    def _hooks(self) -> dict[str, EmulatorHook]:
        return {kind: hook for kind in kinds() if (hook := adapter_class(kind).emulator) is not None}

    def __getitem__(self, kind: str) -> type[EmulatorApp]:
        hook = self._hooks()[kind]
        module, _, name = hook.app.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, EmulatorApp)):
            raise TypeError(f"emulator hook of {kind!r}: {hook.app} is not an EmulatorApp")
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._hooks())

    def __len__(self) -> int:
        return len(self._hooks())

    def __contains__(self, kind: object) -> bool:
        return kind in self._hooks()


PROVIDERS = EmulatedProviders()


def _adapter(provider: str) -> type[Adapter]:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    return adapter_class(provider)


def explicit_base_urls(environ: Mapping[str, str], providers: Iterable[str] | None = None) -> dict[str, str]:
    """The providers whose base-URL variable the user set, with that URL.

    `serve --emulate` leaves these alone (no emulator, no key replaced), so the
    emulated hosted providers can run beside a real local GPU backend, or any
    one provider can be pointed at a rig of your own."""
    wanted = {name: adapter_class(name).base_url_env for name in (PROVIDERS if providers is None else providers)}
    return {name: environ[var] for name, var in wanted.items() if var and environ.get(var, "").strip()}


def build_app(provider: str, key: str | None = None, knobs: EmulatorKnobs | None = None, **kw: Any) -> EmulatorApp:
    """One provider's ASGI app (for uvicorn, or httpx.ASGITransport in tests)."""
    _adapter(provider)
    return PROVIDERS[provider](key, knobs, **kw)


def new_key(provider: str) -> str | None:
    """A fresh random key for a provider with a credential; None for one without (no auth)."""
    adapter = _adapter(provider)
    if adapter.credential_env is None or adapter.emulator is None:
        return None
    return adapter.emulator.key_prefix + secrets.token_hex(12)


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
        providers: Iterable[str] | None = None,
        *,
        knobs: Mapping[str, EmulatorKnobs] | None = None,
        keys: Mapping[str, str | None] | None = None,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
    ) -> None:
        self.providers = list(PROVIDERS if providers is None else providers)
        for name in self.providers:
            _adapter(name)
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
            adapter = adapter_class(name)
            out[adapter.base_url_env] = running.base_url
            if adapter.credential_env:
                out[adapter.credential_env] = running.key
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
    def start_in_thread(cls, providers: Iterable[str] | None = None, *, timeout: float = 30.0, **kw: Any) -> EmulatorFleet:
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
