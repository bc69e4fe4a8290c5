"""The upstream wire on aiohttp: provider calls with no HTTP client layer above it.

`AiohttpWire.send` is one aiohttp request, its answer wrapped in a small
`AiohttpResponse` (status, headers, reason, body): aiohttp's connection pool
and C HTTP parser, and nothing of httpx's client layer (bench/README.md#the-thin-wire
for the figures). What httpx would raise is raised here too, so
`Adapter.request` classifies failures exactly as over httpx:

    refused, DNS, TLS, any failure to connect   httpx.ConnectError
    no connection within the connect timeout    httpx.ConnectTimeout
    no byte within the read timeout             httpx.ReadTimeout
    the peer closed early, or a broken body     httpx.RemoteProtocolError
    a reset or other socket error after that    httpx.ReadError
    not an http(s) URL                          httpx.UnsupportedProtocol

One `aiohttp.ClientSession` per event loop, made inside the loop on its first
request (each uvicorn worker is its own process with its own loop). It keeps
no cookies (a cookie one caller's answer set must never ride along on a call
for another), follows no redirects, reads no proxy settings from the
environment, and decodes gzip and deflate bodies, which it asks for as httpx
did. Timeouts map as httpx's did: connect -> `sock_connect`, read ->
`sock_read` and `connect` (waiting for a free connection, and connecting);
aiohttp has no write timeout.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager

import aiohttp
import httpx
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.net.wire import USER_AGENT, WireTimeout

# aiohttp adds a Content-Type of its own to a bytes body; the adapter already set the one it meant.
_SKIP_AUTO_HEADERS = ("Content-Type",)

# aiohttp's close waits for every socket to report closed, and a socket with
# unsent bytes to a peer that stopped reading never does: shutdown waits this
# long for it, then goes on without.
CLOSE_TIMEOUT_S = 5.0


@contextmanager
def httpx_errors(*, reading: bool = False) -> Iterator[None]:
    """aiohttp's exceptions as the httpx ones that `Adapter.request` classifies."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # before ServerTimeoutError: it is one
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except TimeoutError as exc:  # a socket read (sock_read); aiohttp's ServerTimeoutError is one
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake, unreachable
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(str(exc) or type(exc).__name__) from exc
    except (aiohttp.ClientError, OSError) as exc:  # ClientOSError, resets: mid-exchange
        error = httpx.ReadError if reading else httpx.RemoteProtocolError
        raise error(str(exc) or type(exc).__name__) from exc


class AiohttpResponse:
    """An aiohttp answer as adapters read it (`gateway.net.wire.WireResponse`)."""

    __slots__ = ("_body", "_response", "headers", "reason_phrase", "status_code")

    def __init__(self, response: aiohttp.ClientResponse, body: bytes | None = None) -> None:
        self._response = response
        self._body = body
        self.status_code: int = response.status
        self.headers: CIMultiDictProxy[str] = response.headers
        self.reason_phrase: str = response.reason or ""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def content(self) -> bytes:
        if self._body is None:
            raise httpx.ResponseNotRead()
        return self._body

    @property
    def text(self) -> str:
        return self.content.decode(self._response.charset or "utf-8", "replace")

    async def aread(self) -> bytes:
        if self._body is None:
            with httpx_errors(reading=True):
                self._body = await self._response.read()
            self._response.release()
        return self._body

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self._body is not None:
            if self._body:
                yield self._body
            return
        content = self._response.content
        with httpx_errors(reading=True):
            while chunk := await content.readany():
                yield chunk

    async def aiter_lines(self) -> AsyncIterator[str]:
        """Lines ended by LF, CRLF or CR, without the ending, as httpx splits them.
        A chunk with no line ending is only kept, so a long line costs one join."""
        decoder = codecs.getincrementaldecoder(self._response.charset or "utf-8")("replace")
        pending: list[str] = []
        async for chunk in self.aiter_bytes():
            text = decoder.decode(chunk)
            if "\n" not in text and "\r" not in text:
                pending.append(text)
                continue
            *lines, tail = _split_lines("".join(pending) + text)
            pending = [tail]
            for line in lines:
                yield line
        tail = "".join(pending) + decoder.decode(b"", final=True)
        if tail:
            yield tail.removesuffix("\r")

    async def aclose(self) -> None:
        response = self._response
        if response.content.is_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()  # abandoned mid-body: the connection cannot be reused


def _split_lines(text: str) -> list[str]:
    """Complete lines, then what is left after the last line ending (a CR at
    the very end is left, since an LF may follow in the next chunk)."""
    hold_cr = text.endswith("\r")
    body = text[:-1] if hold_cr else text
    parts = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if hold_cr:
        parts[-1] += "\r"
    return parts


class AiohttpWire:
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
                headers={"User-Agent": USER_AGENT},
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._sessions[loop] = session
        self._last = (loop, session)
        return session

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        timeout: WireTimeout,
        stream: bool = False,
    ) -> AiohttpResponse:
        if not url.startswith(("http://", "https://")):
            raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol '{url.partition(':')[0]}://'.")
        try:
            target = URL(url)
        except ValueError as exc:
            raise httpx.InvalidURL(str(exc)) from None  # as httpx's own parser refuses it
        if not target.host:
            raise httpx.UnsupportedProtocol("Request URL is missing a host.")
        session = self._session()
        limits = aiohttp.ClientTimeout(total=None, connect=timeout.read, sock_connect=timeout.connect, sock_read=timeout.read)
        with httpx_errors():
            response = await session.request(method, target, headers=headers, data=content, allow_redirects=False, timeout=limits)
        if stream:
            return AiohttpResponse(response)
        try:
            with httpx_errors(reading=True):
                body = await response.read()
        except BaseException:
            response.close()
            raise
        response.release()
        return AiohttpResponse(response, body)

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
