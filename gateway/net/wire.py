"""What an adapter asks of HTTP: one exchange, and the answer's status, headers and body.

Adapters and the result shaper send a method, a URL, headers and a body, and
read a status, headers and the body (whole, or as it arrives). They need no
client layer on top of that: no base URL, cookie jar, auth flow, redirect
loop or event hooks. httpx's client layer costs about a third of a
millisecond a call (bench/README.md#upstream-client), and a url answer makes
two calls, so the gateway's own calls go straight to a `Wire`:

- `AiohttpWire` (gateway/net/aiohttp_wire.py): aiohttp's pool and C parser,
  the default (`gateway.upstream_client: aiohttp`);
- `HttpxWire`: any `httpx.AsyncClient`, for `upstream_client: httpx` and for
  tests, which mock HTTP at the wire with respx or `httpx.MockTransport`.

Either raises httpx's transport exceptions (`httpx.ConnectError`,
`httpx.ReadTimeout`, ...) for a failed exchange, so `Adapter.request`
classifies failures one way whichever carries the call
(docs/design.md#failure-classes). Neither follows a redirect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

USER_AGENT = "klein-gateway/0.1"  # on every provider call, whichever wire carries it


@dataclass(frozen=True, slots=True)
class WireTimeout:
    """Seconds without a byte (`read`) and to connect (`connect`); waiting
    for a free pooled connection counts against `read`, as httpx's pool
    timeout did."""

    read: float
    connect: float

    @classmethod
    def of(cls, seconds: float) -> WireTimeout:
        return cls(read=seconds, connect=seconds)


class WireResponse(Protocol):
    """The answer, as adapters read it: an `httpx.Response` is one."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...  # case-insensitive
    @property
    def reason_phrase(self) -> str: ...
    @property
    def is_success(self) -> bool: ...
    @property
    def content(self) -> bytes: ...  # the whole body, once read
    @property
    def text(self) -> str: ...
    async def aread(self) -> bytes: ...
    def aiter_bytes(self) -> AsyncIterator[bytes]: ...
    def aiter_lines(self) -> AsyncIterator[str]: ...
    async def aclose(self) -> None: ...


class Wire(Protocol):
    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout: WireTimeout,
        stream: bool = False,
    ) -> WireResponse:
        """One exchange. `stream=False` returns with the body read and the
        connection back in the pool; `stream=True` returns once the headers
        arrived, and the caller reads the body and closes the response."""
        ...

    async def aclose(self) -> None: ...


class HttpxWire:
    """A `Wire` over an `httpx.AsyncClient`: its transport decides where bytes go."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout: WireTimeout,
        stream: bool = False,
    ) -> httpx.Response:
        t = httpx.Timeout(timeout.read, connect=timeout.connect)
        request = self.client.build_request(method, url, headers=headers, content=content, timeout=t)
        return await self.client.send(request, stream=stream, follow_redirects=False)

    async def aclose(self) -> None:
        await self.client.aclose()


def as_wire(carrier: httpx.AsyncClient | Wire) -> Wire:
    """A wire as it is, an httpx client wrapped in one."""
    return HttpxWire(carrier) if isinstance(carrier, httpx.AsyncClient) else carrier
