"""A minimal ASGI toolkit for the emulators: request, response, routes.

Why not litestar here: the overhead benchmark sends thousands of requests
straight at the emulators and compares with the gateway, so the emulator's
own cost per request must be close to nothing. A plain ASGI callable with a
handful of precompiled routes and no middleware stays in the tens of
microseconds; a framework adds its routing, DI and serialisation layers.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

try:  # orjson is much faster on multi-megabyte base64 payloads; json is the fallback
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - depends on the environment
    import json

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def loads(data: bytes) -> Any:
        return json.loads(data)


JSON = b"application/json"


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", content_type)]
        if headers:
            self.headers.extend((k.lower().encode(), str(v).encode()) for k, v in headers.items())

    @classmethod
    def json(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
        return cls(status, dumps(value), JSON, headers)

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode()
        return None


class Request:
    """One HTTP request; the body is read once, on demand."""

    __slots__ = ("_body", "_headers", "fault", "method", "params", "path", "receive", "scope", "send")

    def __init__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[..., Awaitable[None]]) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._headers: dict[str, str] | None = None
        self._body: bytes | None = None
        self.params: tuple[str, ...] = ()
        self.fault: str | None = None  # a job-level fault the emulator injects into this create

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope["headers"]}
        return self._headers

    @property
    def query(self) -> str:
        return self.scope.get("query_string", b"").decode("latin-1")

    def base_url(self) -> str:
        """scheme://host[:port] as the client addressed us (from Host)."""
        host = self.headers.get("host")
        if not host:
            server = self.scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{self.scope.get('scheme', 'http')}://{host}"

    async def body(self) -> bytes:
        if self._body is None:
            chunks = []
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    break
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        """The JSON body; raises ValueError when it is not JSON."""
        data = await self.body()
        if not data:
            raise ValueError("empty body")
        return loads(data)


Handler = Callable[[Request], Awaitable[Response | None]]  # None: a fault already answered or dropped the connection


@dataclass(frozen=True, slots=True)
class Route:
    """`paid`: the call creates work a provider bills. `auth`: needs the key."""

    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler
    paid: bool = False
    auth: bool = True


def route(method: str, path: str, name: str, handler: Handler, *, paid: bool = False, auth: bool = True) -> Route:
    """`path` may hold `{param}` segments (no slashes)."""
    regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"([^/]+)", re.escape(path)) + "$"
    return Route(method, re.compile(regex), name, handler, paid, auth)


def match(routes: list[Route], method: str, path: str) -> tuple[Route | None, tuple[str, ...], bool]:
    """(route, params, path_known). path_known with no route means 405."""
    path_known = False
    for r in routes:
        m = r.pattern.match(path)
        if m:
            if r.method == method:
                return r, m.groups(), True
            path_known = True
    return None, (), path_known


async def send_response(send: Callable[..., Awaitable[None]], response: Response) -> None:
    headers = response.headers + [(b"content-length", str(len(response.body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def hold(request: Request, seconds: float, release: asyncio.Event | None = None) -> bool:
    """Sleep up to `seconds`; stop early if the client hangs up or `release` is set.

    Returns True if the client is still there. The request body must have
    been read already (the next receive() then only reports a disconnect)."""
    if seconds <= 0:
        return True
    await request.body()
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.sleep(seconds)), asyncio.ensure_future(_disconnect(request))]
    if release is not None:
        waiters.append(asyncio.ensure_future(release.wait()))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return waiters[1] not in done


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ConnectionReset(Exception):
    """Raised when the server could not reach the socket to reset it."""


async def reset_connection(request: Request) -> None:
    """Close the client's socket with a TCP RST and no response at all.

    uvicorn answers 500 when an app raises before starting a response, so
    a raise would not look like a reset. Instead, reach the connection's
    transport through uvicorn's `send` (a bound method of its request cycle),
    set SO_LINGER 0 (so close sends RST) and abort it. The client sees a
    transport error (httpx.ReadError / RemoteProtocolError)."""
    cycle = getattr(request.send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionReset("no transport to reset")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()
    # Let uvicorn see connection_lost before the app returns, so it does not
    # try to send its own 500 on the dead socket.
    for _ in range(3):
        await asyncio.sleep(0)
