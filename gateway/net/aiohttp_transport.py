"""The upstream HTTP transport on aiohttp, under httpx's client.

Adapters keep talking to an `httpx.AsyncClient` and reading `httpx.Response`;
only the wire underneath changes: aiohttp's connection pool and its C HTTP
parser instead of httpcore's pools and h11 (docs/design.md#upstream-client,
bench/README.md#upstream-client for the figures). What httpx would raise is
raised here too, so `Adapter.request` classifies failures as before:

    refused, DNS, TLS, any failure to connect   httpx.ConnectError
    no connection within the connect timeout    httpx.ConnectTimeout
    no byte within the read timeout             httpx.ReadTimeout
    the peer closed early, or a broken body     httpx.RemoteProtocolError
    a reset or other socket error after that    httpx.ReadError
    not an http(s) URL                          httpx.UnsupportedProtocol

One `aiohttp.ClientSession` per event loop, made inside the loop on its first
request (each uvicorn worker is its own process with its own loop). It keeps
no cookies, follows no redirects (httpx does, where asked), reads no proxy
settings from the environment and leaves Content-Encoding alone, so httpx
decodes a body exactly once. httpx's per-request timeouts map onto aiohttp's:
connect -> `sock_connect`, read -> `sock_read`, pool -> `connect` (waiting for
a free connection, and connecting); aiohttp has no write timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

# aiohttp adds these unless told not to; httpx's client already sent what it meant to.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

# aiohttp's close waits for every socket to report closed, and a socket with
# unsent bytes to a peer that stopped reading never does: shutdown waits this
# long for it, then goes on without.
CLOSE_TIMEOUT_S = 5.0


@contextmanager
def _httpx_errors(request: httpx.Request, *, reading: bool = False) -> Iterator[None]:
    """aiohttp's exceptions as the httpx ones that `Adapter.request` classifies."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # before ServerTimeoutError: it is one
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except TimeoutError as exc:  # a socket read (sock_read); aiohttp's ServerTimeoutError is one
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake, unreachable
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:  # ClientOSError, resets: mid-exchange
        error = httpx.ReadError if reading else httpx.RemoteProtocolError
        raise error(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    """The response body as aiohttp reads it; closing it releases the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        with _httpx_errors(self._request, reading=True):
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk

    async def aclose(self) -> None:
        response = self._response
        if response.content.is_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()  # abandoned mid-body: the connection cannot be reused


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int, *, keepalive_expiry: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context or httpx.create_ssl_context()
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._last: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop and not last[1].closed:
            return last[1]
        session = self._sessions.get(loop)
        if session is None or session.closed:
            for old in [lp for lp in self._sessions if lp.is_closed()]:  # a finished loop's session is unusable
                del self._sessions[old]
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, keepalive_timeout=self.keepalive_expiry, ssl=self._ssl)
            session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,  # httpx decodes Content-Encoding
                trust_env=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._sessions[loop] = session
        self._last = (loop, session)
        return session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol '{request.url.scheme}://'.", request=request)
        if not request.url.host:
            raise httpx.UnsupportedProtocol("Request URL is missing a host.", request=request)
        session = self._session()
        t = request.extensions.get("timeout") or {}
        timeout = aiohttp.ClientTimeout(total=None, connect=t.get("pool"), sock_connect=t.get("connect"), sock_read=t.get("read"))
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw)
        data: Any
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = _upload(request.stream)
            headers.popall("Transfer-Encoding", None)  # aiohttp sets it again itself for a body of unknown length
        with _httpx_errors(request):
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
                compress=None,
                chunked=None,
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode("latin-1", "replace")},
        )

    async def aclose(self) -> None:
        sessions, self._sessions, self._last = self._sessions, {}, None
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, session in sessions.items():
            if loop is current:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await session.close()
            elif not loop.is_closed():
                asyncio.run_coroutine_threadsafe(session.close(), loop)  # that loop's own session, closed on that loop


async def _upload(stream: httpx.AsyncByteStream | httpx.SyncByteStream) -> AsyncIterator[bytes]:
    """A streamed request body (none of the adapters uploads one today)."""
    if isinstance(stream, httpx.AsyncByteStream):
        async for chunk in stream:
            yield chunk
    else:
        for chunk in stream:
            yield chunk
