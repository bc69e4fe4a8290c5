"""Fetch caller URLs from the address that was checked, never from a second lookup.

Checking a name's addresses and then letting the HTTP client resolve it again
leaves a window: a DNS server that answers "public" to the check and
"127.0.0.1" to the connect (DNS rebinding) gets the gateway to fetch from
inside its own network. Here the name is resolved once per connection, every
address is checked (`gateway.net.addresses`), and the socket is opened to the
checked address itself. TLS still verifies the certificate for the name
(httpcore passes the URL's host as SNI and for hostname checking) and the
`Host` header is the URL's, so the far end sees an ordinary request.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from ipaddress import ip_address
from typing import Any, Protocol

import httpcore
import httpx

from gateway.net.addresses import HostRefused, IPAddress, refuse_unless_all_public, refuse_unless_public_host
from gateway.net.allowlist import NOTHING_ALLOWED, Allowlist

RESOLVE_TIMEOUT_S = 2.0
FETCH_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=32)
_NO_SUCH_NAME = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


class HostUnresolved(OSError):
    """A name could not be resolved. `permanent`: the name does not exist
    (rather than a resolver that did not answer in time)."""

    def __init__(self, host: str, *, permanent: bool) -> None:
        super().__init__(f"{host!r} {'does not resolve' if permanent else 'could not be resolved in time'}")
        self.permanent = permanent


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address `host` has; raises HostUnresolved."""
        ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo), bounded in time."""

    def __init__(self, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise HostUnresolved(host, permanent=False) from None
        except socket.gaierror as exc:
            raise HostUnresolved(host, permanent=exc.errno in _NO_SUCH_NAME) from None
        seen: dict[IPAddress, None] = {}
        for info in infos:
            seen.setdefault(ip_address(info[4][0]), None)
        return list(seen)


async def public_addresses(host: str, port: int, resolver: Resolver, allow: Allowlist = NOTHING_ALLOWED) -> list[IPAddress]:
    """The addresses to connect to for `host`: all of them public (or
    allowlisted), or HostRefused.

    Raises HostUnresolved when the name has no answer: a caller's URL whose
    name does not resolve is never treated as allowed."""
    literal = refuse_unless_public_host(host, allow)
    if literal is not None:
        return [literal]
    addresses = await resolver.resolve(host, port)
    refuse_unless_all_public(host, addresses, allow)
    return addresses


class AddressRefused(httpcore.ConnectError):
    """The connection was not opened: the host is not public, or does not resolve."""


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Opens each TCP connection to an address `public_addresses` returned."""

    def __init__(self, resolver: Resolver, inner: httpcore.AsyncNetworkBackend | None = None, allow: Allowlist = NOTHING_ALLOWED) -> None:
        self.resolver = resolver
        self.inner = inner or httpcore.AnyIOBackend()
        self.allow = allow

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await public_addresses(host, port, self.resolver, self.allow)
        except (HostRefused, HostUnresolved) as exc:
            raise AddressRefused(str(exc)) from exc
        last: Exception | None = None
        for addr in addresses:
            try:
                return await self.inner.connect_tcp(str(addr), port, timeout=timeout, local_address=local_address, socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("caller URLs are fetched over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, its connection pool opening sockets through
    `PinnedNetworkBackend`. Never uses a proxy from the environment (a proxy
    would resolve the name itself)."""

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        limits: httpx.Limits = FETCH_LIMITS,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        ssl_context: ssl.SSLContext | None = None,
        allow: Allowlist = NOTHING_ALLOWED,
    ) -> None:
        """`network_backend`: what finally opens the socket to the checked address
        (httpcore's anyio backend by default); `ssl_context`: the certificates
        trusted (the certifi bundle by default); `allow`: the operator's
        non-public hosts this client may reach (webhook receivers)."""
        super().__init__(trust_env=False, limits=limits)
        self.resolver = resolver or SystemResolver()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedNetworkBackend(self.resolver, network_backend, allow),
        )
