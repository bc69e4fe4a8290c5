"""The aiohttp wire, against a real loopback server.

What adapters read (status, headers, body, streamed bodies and lines, Range
answers, gzip decoded once) must come through as httpx delivered it,
connections must be reused, and every failure must surface as the httpx
exception `Adapter.request` classifies, so the failure classes stay what
docs/design.md#failure-classes says.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx
import msgspec
import pytest
from aiohttp import web

from gateway.app import build_gateway
from gateway.config import ConfigError, load_config
from gateway.net.aiohttp_wire import AiohttpWire, httpx_errors
from gateway.net.wire import HttpxWire, Wire, WireResponse, WireTimeout
from gateway.providers.base import AdapterSettings, FailureClass, ProviderError, Timeouts
from gateway.providers.local import LocalAdapter
from tests.gateway_support import ENV, PROVIDERS_YAML

msgspec_json = msgspec.json.decode
BIG = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB, every byte value
TEXT = b"the same line, again and again\n" * 2000


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    headers = [[k, v] for k, v in request.headers.items()]
    return web.json_response({"method": request.method, "headers": headers, "length": len(body), "body": body.decode("latin-1")}, status=201, headers={"x-answer": "yes"})


async def duplicate_headers(_: web.Request) -> web.Response:
    response = web.Response(body=b"ok")
    response.headers.add("x-dup", "first")
    response.headers.add("x-dup", "second")
    response.headers.add("set-cookie", "a=1; Path=/")
    response.headers.add("set-cookie", "b=2; Path=/")
    return response


async def big(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-length": str(len(BIG)), "content-type": "application/octet-stream"})
    await response.prepare(request)
    for i in range(0, len(BIG), 256 * 1024):
        await response.write(BIG[i : i + 256 * 1024])
    await response.write_eof()
    return response


async def ranged(request: web.Request) -> web.Response:
    first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
    start, end = int(first), int(last)
    return web.Response(status=206, body=BIG[start : end + 1], headers={"content-range": f"bytes {start}-{end}/{len(BIG)}"})


async def gzipped(_: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(TEXT), headers={"content-encoding": "gzip", "content-type": "text/plain"})


async def peer(request: web.Request) -> web.Response:
    assert request.transport is not None
    return web.Response(text=str(request.transport.get_extra_info("peername")[1]))


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query["s"]))
    return web.Response(text="late")


async def stall_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-length": "2000"})
    await response.prepare(request)
    await response.write(b"x" * 1000)
    await asyncio.sleep(float(request.query["s"]))
    await response.write(b"x" * 1000)
    return response


async def cut(request: web.Request) -> web.StreamResponse:
    """Promises a megabyte, sends a kilobyte, then closes the connection."""
    response = web.StreamResponse(headers={"content-length": str(1024 * 1024)})
    await response.prepare(request)
    await response.write(b"x" * 1024)
    assert request.transport is not None
    request.transport.close()
    return response


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/dup", duplicate_headers)
    app.router.add_get("/big", big)
    app.router.add_get("/range", ranged)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/peer", peer)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stall-body", stall_body)
    app.router.add_get("/cut", cut)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)  # slow handlers still asleep are not waited for
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def wire() -> AsyncIterator[AiohttpWire]:
    w = AiohttpWire(16)
    try:
        yield w
    finally:
        await w.aclose()


async def send(wire: Wire, method: str, url: str, *, headers: Mapping[str, str] | None = None, content: bytes | None = None, timeout: float = 5.0, stream: bool = False) -> WireResponse:
    return await wire.send(method, url, headers=headers or {}, content=content, timeout=WireTimeout.of(timeout), stream=stream)


def refused_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def adapter(wire: Wire, base: str, *, request_s: float = 2.0) -> LocalAdapter:
    return LocalAdapter(AdapterSettings(name="local", base_url=base, credential=None, timeouts=Timeouts(connect=1.0, request=request_s)), wire)


async def test_status_headers_and_body_round_trip(server: str, wire: AiohttpWire) -> None:
    resp = await send(wire, "POST", f"{server}/echo", content=b"\x00payload\xff", headers={"x-one": "1", "x-Two": "2"})
    assert resp.status_code == 201 and resp.is_success
    assert resp.reason_phrase == "Created"
    assert resp.headers["x-answer"] == "yes" and resp.headers["X-ANSWER"] == "yes"
    got = msgspec_json(resp.content)
    assert got["method"] == "POST" and got["length"] == 9 and got["body"] == "\x00payload\xff"
    sent = [(k.lower(), v) for k, v in got["headers"]]
    assert ("x-one", "1") in sent and ("x-two", "2") in sent
    assert ("user-agent", "klein-gateway/0.1") in sent and ("content-length", "9") in sent
    assert [k for k, _ in sent if k == "user-agent"] == ["user-agent"]
    assert not any(k == "content-type" for k, _ in sent)  # aiohttp adds none of its own
    assert not any(k == "cookie" for k, _ in sent)


async def test_adapter_json_is_sent_compact_with_its_content_type(server: str, wire: AiohttpWire) -> None:
    resp = await adapter(wire, server).request("POST", f"{server}/echo", deadline=time.monotonic() + 5, json={"prompt": "a fox", "n": 1})
    got = msgspec_json(resp.content)
    sent = dict((k.lower(), v) for k, v in got["headers"])
    assert got["body"] == '{"prompt":"a fox","n":1}' and sent["content-type"] == "application/json"
    resp = await send(wire, "GET", f"{server}/echo")
    assert msgspec_json(resp.content)["method"] == "GET" and msgspec_json(resp.content)["length"] == 0


async def test_duplicate_response_headers_are_kept_in_order(server: str, wire: AiohttpWire) -> None:
    resp = await send(wire, "GET", f"{server}/dup")
    assert resp.headers.getall("x-dup") == ["first", "second"]  # type: ignore[attr-defined]
    assert resp.headers.getall("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]  # type: ignore[attr-defined]


async def test_multi_megabyte_body_streams_in_pieces(server: str, wire: AiohttpWire) -> None:
    resp = await send(wire, "GET", f"{server}/big", stream=True)
    chunks = []
    try:
        assert resp.headers["content-length"] == str(len(BIG))
        async for chunk in resp.aiter_bytes():
            chunks.append(chunk)
    finally:
        await resp.aclose()
    assert b"".join(chunks) == BIG
    assert len(chunks) > 1  # handed over as it arrives, not read whole first
    whole = await send(wire, "GET", f"{server}/big")
    assert whole.content == BIG and await whole.aread() == BIG


async def test_a_streamed_body_read_whole_gives_the_connection_back(server: str) -> None:
    wire = AiohttpWire(1)
    try:
        for _ in range(3):
            resp = await send(wire, "GET", f"{server}/range", headers={"range": "bytes=0-9"}, stream=True)
            assert await resp.aread() == BIG[:10]
        assert (await send(wire, "GET", f"{server}/peer", timeout=2.0)).status_code == 200
    finally:
        await wire.aclose()


async def test_range_request_and_an_abandoned_stream(server: str, wire: AiohttpWire) -> None:
    resp = await send(wire, "GET", f"{server}/range", headers={"range": "bytes=0-65535"})
    assert resp.status_code == 206 and resp.content == BIG[:65536]
    streamed = await send(wire, "GET", f"{server}/big", stream=True)  # what ResultShaper._head does with a server that ignores Range
    async for _ in streamed.aiter_bytes():
        break
    await streamed.aclose()
    again = await send(wire, "GET", f"{server}/range", headers={"range": "bytes=10-19"})
    assert again.content == BIG[10:20]


async def test_abandoned_streams_give_their_connections_back(server: str) -> None:
    wire = AiohttpWire(2)
    try:
        kept = []  # the responses stay referenced, as a caller's may: only closing frees the connection
        for _ in range(4):
            resp = await send(wire, "GET", f"{server}/big", stream=True)
            async for _ in resp.aiter_bytes():
                break
            await resp.aclose()
            kept.append(resp)
        assert (await send(wire, "GET", f"{server}/peer", timeout=2.0)).status_code == 200
    finally:
        await wire.aclose()


async def test_gzip_body_is_decoded_exactly_once(server: str, wire: AiohttpWire) -> None:
    resp = await send(wire, "GET", f"{server}/gzip")
    assert resp.headers["content-encoding"] == "gzip"
    assert resp.content == TEXT and resp.text == TEXT.decode()


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\nb\n"], ["a", "b"]),
        ([b"a\r\nb\r\n\r\n"], ["a", "b", ""]),
        ([b"a\r", b"\nb"], ["a", "b"]),  # CRLF split across chunks is one ending
        ([b"data: x", b"yz\n", b"\n"], ["data: xyz", ""]),  # a line in pieces, then the blank line ending an event
        ([b"a\rb\r"], ["a", "b"]),
        ([b"caf\xc3", b"\xa9\n"], ["caf\u00e9"]),  # UTF-8 split across chunks
        ([b"no ending"], ["no ending"]),
    ],
)
async def test_lines_are_split_as_httpx_splits_them(chunks: list[bytes], lines: list[str]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/lines", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    wire = AiohttpWire(2)
    try:
        resp = await send(wire, "GET", f"http://127.0.0.1:{port}/lines", stream=True)
        got = [line async for line in resp.aiter_lines()]
        await resp.aclose()
        via_httpx = await httpx.AsyncClient().get(f"http://127.0.0.1:{port}/lines")
        assert got == lines == list(via_httpx.iter_lines())
    finally:
        await wire.aclose()
        await runner.cleanup()


async def test_keep_alive_reuses_one_connection(server: str, wire: AiohttpWire) -> None:
    ports = {(await send(wire, "GET", f"{server}/peer")).text for _ in range(5)}
    assert len(ports) == 1


async def test_per_request_timeout_is_honoured(server: str, wire: AiohttpWire) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await send(wire, "GET", f"{server}/slow?s=2", timeout=0.2)
    assert time.monotonic() - started < 1.5
    resp = await send(wire, "GET", f"{server}/slow?s=0.3", timeout=2.0)
    assert resp.text == "late"


async def test_read_timeout_while_reading_the_body(server: str, wire: AiohttpWire) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await send(wire, "GET", f"{server}/stall-body?s=2", timeout=0.3)


async def test_server_closing_mid_body_is_a_transport_error_not_a_hang(server: str, wire: AiohttpWire) -> None:
    with pytest.raises(httpx.TransportError):
        await asyncio.wait_for(send(wire, "GET", f"{server}/cut"), timeout=5)
    assert (await send(wire, "GET", f"{server}/peer")).status_code == 200  # the pool is still usable


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://127.0.0.1/file", httpx.UnsupportedProtocol),
        ("http:///no-host", httpx.UnsupportedProtocol),
        ("http://[::1/", httpx.InvalidURL),
    ],
)
async def test_a_url_the_wire_cannot_use_is_refused_as_httpx_refuses_it(wire: AiohttpWire, url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await send(wire, "GET", url)
    with pytest.raises(error):
        await HttpxWire(httpx.AsyncClient()).send("GET", url, headers={}, timeout=WireTimeout.of(1))


@pytest.mark.parametrize(
    ("path", "job_id", "failure"),
    [
        (None, None, FailureClass.UNREACHABLE),  # connection refused: never reached the provider
        (None, "job-1", FailureClass.UNKNOWN_OUTCOME),
        ("/slow?s=2", None, FailureClass.UNKNOWN_OUTCOME),  # read timeout: submitted, outcome unknown
        ("/slow?s=2", "job-1", FailureClass.UNKNOWN_OUTCOME),
        ("/cut", None, FailureClass.FAILED),  # the connection broke mid-answer
        ("/cut", "job-1", FailureClass.UNKNOWN_OUTCOME),
    ],
)
@pytest.mark.parametrize("carrier", ["aiohttp", "httpx"])
async def test_adapter_request_failure_classes_are_the_same_on_either_wire(server: str, carrier: str, path: str | None, job_id: str | None, failure: FailureClass) -> None:
    url = refused_url() if path is None else f"{server}{path}"
    wire: Wire = AiohttpWire(4) if carrier == "aiohttp" else HttpxWire(httpx.AsyncClient())
    try:
        with pytest.raises(ProviderError) as err:
            await adapter(wire, server, request_s=0.3).request("GET", url, deadline=time.monotonic() + 5, job_id=job_id)
        assert err.value.failure is failure, err.value
    finally:
        await wire.aclose()


def _key() -> Any:
    return aiohttp.client_reqrep.ConnectionKey("h", 80, False, True, None, None, None)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
        (aiohttp.ServerTimeoutError("read"), httpx.ReadTimeout),
        (TimeoutError(), httpx.ReadTimeout),
        (aiohttp.ClientConnectorError(_key(), ConnectionRefusedError(111, "refused")), httpx.ConnectError),
        (aiohttp.ClientConnectorDNSError(_key(), OSError(-2, "Name or service not known")), httpx.ConnectError),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError("Response payload is not completed"), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), httpx.RemoteProtocolError),
        (aiohttp.InvalidURL("http://"), httpx.UnsupportedProtocol),
        (aiohttp.NonHttpUrlClientError("ftp://x"), httpx.UnsupportedProtocol),
    ],
)
def test_aiohttp_errors_become_the_httpx_errors_adapters_classify(raised: BaseException, expected: type[Exception]) -> None:
    with pytest.raises(expected), httpx_errors():
        raise raised


def test_errors_while_reading_the_body_are_read_errors() -> None:
    with pytest.raises(httpx.ReadError), httpx_errors(reading=True):
        raise aiohttp.ClientOSError(104, "Connection reset by peer")


async def test_one_session_per_loop_closed_on_aclose(server: str) -> None:
    wire = AiohttpWire(4)
    await send(wire, "GET", f"{server}/peer")
    await send(wire, "GET", f"{server}/peer")
    sessions = list(wire._sessions.values())
    assert len(sessions) == 1 and not sessions[0].closed
    await wire.aclose()
    assert sessions[0].closed and not wire._sessions


async def test_aclose_does_not_wait_forever_for_a_socket_that_will_not_close(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    wire = AiohttpWire(4)
    await send(wire, "GET", f"{server}/peer")
    (session,) = wire._sessions.values()

    async def never_closes() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(session, "close", never_closes)
    monkeypatch.setattr("gateway.net.aiohttp_wire.CLOSE_TIMEOUT_S", 0.2)
    started = time.monotonic()
    await asyncio.wait_for(wire.aclose(), timeout=5)
    assert time.monotonic() - started < 2
    await session.connector.close()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        ("aiohttp", {}, "AiohttpWire"),
        ("aiohttp", {"KLEIN_UPSTREAM_CLIENT": "httpx"}, "ShardedTransport"),
        ("httpx", {}, "ShardedTransport"),
        ("httpx", {"KLEIN_UPSTREAM_CLIENT": "aiohttp"}, "AiohttpWire"),
    ],
)
async def test_upstream_client_choice(configured: str, env: dict[str, str], expected: str) -> None:
    full_env = {**ENV, **env}
    config = load_config(PROVIDERS_YAML, env=full_env)
    config.settings.upstream_client = configured  # type: ignore[assignment]
    gw = build_gateway(config, full_env)
    try:
        wire = gw.clients[0]
        carrier = type(wire._transport if isinstance(wire, httpx.AsyncClient) else wire.client._transport if isinstance(wire, HttpxWire) else wire).__name__
        assert carrier == expected
        assert all(b.adapter.wire is wire for b in gw.fleet.backends.values())  # one wire for every adapter
        assert gw.dispatcher.shaper.wire is wire  # and for the image header reads
        assert type(gw.clients[1]._transport).__name__ == "PinnedTransport"  # type: ignore[union-attr] # reference downloads stay on httpx
    finally:
        await gw.close()


def test_shipped_default_is_aiohttp() -> None:
    assert load_config(PROVIDERS_YAML, env=ENV).settings.upstream_client == "aiohttp"


def test_unknown_upstream_client_is_a_config_error() -> None:
    env = {**ENV, "KLEIN_UPSTREAM_CLIENT": "curl"}
    with pytest.raises(ConfigError, match="KLEIN_UPSTREAM_CLIENT"):
        build_gateway(load_config(PROVIDERS_YAML, env=env), env)


@pytest.mark.parametrize("carrier", ["aiohttp", "httpx"])
async def test_a_cookie_one_provider_answer_sets_is_never_sent_on_a_later_call(carrier: str) -> None:
    seen: list[str | None] = []

    async def provider(request: web.Request) -> web.Response:
        seen.append(request.headers.get("cookie"))
        return web.json_response({"ok": True}, headers={"set-cookie": "session=caller-a; Path=/"})

    app = web.Application()
    app.router.add_post("/v1/run", provider)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    env = {**ENV, "KLEIN_UPSTREAM_CLIENT": carrier}
    gw = build_gateway(load_config(PROVIDERS_YAML, env=env), env)
    try:
        backend = next(iter(gw.fleet.backends.values()))
        for _ in range(2):
            answer = await backend.adapter.request("POST", f"http://127.0.0.1:{port}/v1/run", deadline=time.monotonic() + 5, json={})
            assert answer.headers["set-cookie"].startswith("session=")
        assert seen == [None, None]
    finally:
        await gw.close()
        await runner.cleanup()


# ---- HTTPS, as every hosted provider is reached ------------------------------


def loopback_certificate(directory: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made with openssl for this test."""
    cert, key = directory / "loopback.crt", directory / "loopback.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture
async def tls_server(tmp_path: Any) -> AsyncIterator[tuple[str, str]]:
    cert, key = loopback_certificate(tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_side)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}", cert
    finally:
        await runner.cleanup()


async def test_https_with_a_trusted_certificate_round_trips(tls_server: tuple[str, str]) -> None:
    base, cert = tls_server
    wire = AiohttpWire(4, ssl_context=ssl.create_default_context(cafile=cert))
    try:
        answer = await send(wire, "POST", f"{base}/echo", content=b"over tls")
    finally:
        await wire.aclose()
    assert answer.status_code == 201
    assert msgspec_json(answer.content)["body"] == "over tls"


async def test_https_with_an_untrusted_certificate_is_unreachable_not_sent(tls_server: tuple[str, str]) -> None:
    base, _ = tls_server
    wire = AiohttpWire(4)  # the default trust store does not know it
    try:
        with pytest.raises(httpx.ConnectError):
            await send(wire, "POST", f"{base}/echo", content=b"secret prompt")
        with pytest.raises(ProviderError) as caught:
            await adapter(wire, base).request("POST", f"{base}/echo", deadline=time.monotonic() + 5, content=b"secret prompt")
    finally:
        await wire.aclose()
    assert caught.value.failure is FailureClass.UNREACHABLE
