"""The upstream HTTP transport: many small connection pools instead of one big one.

httpcore rescans every connection of a pool at each request's start and end,
so a single pool of thousands of connections costs CPU quadratic in its size
(encode/httpcore#1035); above its keep-alive limit it also closes every
connection that goes idle. Round-robin over pools of 32 keeps each scan short
and every connection reusable. Measured with bench/overhead.py: a client's CPU
per request at 500 concurrent falls from about 8 ms to about 1 ms.
"""

from __future__ import annotations

import http.cookiejar
import itertools
import math
from collections.abc import Mapping
from typing import Any

import httpx

from gateway.net.wire import USER_AGENT, HttpxWire, Wire
from gateway.settings import Settings

SHARD_SIZE = 32


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int, *, keepalive_expiry: float = 30.0, shard_size: int = SHARD_SIZE) -> None:
        shards = max(1, math.ceil(max_connections / shard_size))
        per = math.ceil(max_connections / shards)
        ssl = httpx.create_ssl_context()
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per, keepalive_expiry=keepalive_expiry)
        self._pools = [httpx.AsyncHTTPTransport(verify=ssl, limits=limits) for _ in range(shards)]
        self._next = itertools.cycle(self._pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._next).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


UPSTREAM_CLIENT_ENV = "KLEIN_UPSTREAM_CLIENT"
UPSTREAM_CLIENTS = ("aiohttp", "httpx")


def upstream_client_choice(configured: str, env: Mapping[str, str]) -> str:
    """`KLEIN_UPSTREAM_CLIENT` if set, else providers.yaml `gateway.upstream_client`."""
    choice = (Settings.from_env(env).upstream_client or configured).strip().lower()
    if choice not in UPSTREAM_CLIENTS:
        raise ValueError(f"{UPSTREAM_CLIENT_ENV}: {choice!r} is not one of {', '.join(UPSTREAM_CLIENTS)}")
    return choice


def upstream_wire(choice: str, max_connections: int, *, keepalive_expiry: float = 30.0) -> Wire:
    """What provider calls travel on: aiohttp with no client layer (the default,
    bench/README.md#the-thin-wire) or an httpx client on httpx's sharded pools."""
    if choice == "aiohttp":
        from gateway.net.aiohttp_wire import AiohttpWire

        return AiohttpWire(max_connections, keepalive_expiry=keepalive_expiry)
    return httpx_wire(ShardedTransport(max_connections, keepalive_expiry=keepalive_expiry))


def httpx_wire(transport: httpx.AsyncBaseTransport) -> HttpxWire:
    """An httpx client for provider calls over `transport`: no cookies, the gateway's user agent."""
    return HttpxWire(httpx.AsyncClient(transport=transport, cookies=NoCookies(), headers={"user-agent": USER_AGENT}))


class NoCookies(http.cookiejar.CookieJar):
    """The provider client's cookie jar, which never keeps or sends a cookie.

    Provider APIs authenticate with a key, not a session, and a cookie one
    caller's answer set must not ride along on the calls the gateway makes
    for other callers. httpx has no switch to turn its jar off."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None
