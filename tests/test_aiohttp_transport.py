"""The aiohttp transport under httpx's client, against a real loopback server.

What adapters read (status, headers, body, streamed bodies, Range answers,
gzip decoded once) must come through as httpx's own transport delivers it,
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
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from gateway.app import build_gateway
from gateway.config import ConfigError, load_config
from gateway.net.aiohttp_transport import AiohttpTransport, _httpx_errors
from gateway.net.transport import ShardedTransport
from gateway.providers.base import AdapterSettings, FailureClass, ProviderError, Timeouts
from gateway.providers.local import LocalAdapter
from tests.gateway_support import ENV, PROVIDERS_YAML

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
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=AiohttpTransport(16), headers={"user-agent": "klein-gateway/0.1"}) as c:
        yield c


def refused_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def adapter(client: httpx.AsyncClient, base: str, *, request_s: float = 2.0) -> LocalAdapter:
    return LocalAdapter(AdapterSettings(name="local", base_url=base, credential=None, timeouts=Timeouts(connect=1.0, request=request_s)), client)


async def test_status_headers_and_body_round_trip(server: str, client: httpx.AsyncClient) -> None:
    resp = await client.post(f"{server}/echo", content=b"\x00payload\xff", headers=[("x-one", "1"), ("x-Two", "2"), ("x-one", "again")])
    assert resp.status_code == 201
    assert resp.reason_phrase == "Created"
    assert resp.headers["x-answer"] == "yes"
    got = resp.json()
    assert got["method"] == "POST" and got["length"] == 9 and got["body"] == "\x00payload\xff"
    sent = [(k.lower(), v) for k, v in got["headers"]]
    assert [v for k, v in sent if k == "x-one"] == ["1", "again"]  # duplicates kept, in order
    assert ("user-agent", "klein-gateway/0.1") in sent and ("content-length", "9") in sent
    assert [k for k, _ in sent if k == "user-agent"] == ["user-agent"]  # httpx's header, not aiohttp's as well
    assert not any(k == "content-type" for k, _ in sent)  # aiohttp adds none of its own


async def test_json_body_and_empty_get(server: str, client: httpx.AsyncClient) -> None:
    resp = await client.post(f"{server}/echo", json={"prompt": "a fox"})
    sent = dict((k.lower(), v) for k, v in resp.json()["headers"])
    assert resp.json()["body"] == '{"prompt":"a fox"}' and sent["content-type"] == "application/json"
    resp = await client.get(f"{server}/echo")
    assert resp.json()["method"] == "GET" and resp.json()["length"] == 0


async def test_streamed_upload_is_sent_whole(server: str, client: httpx.AsyncClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * 16384

    resp = await client.post(f"{server}/echo", content=parts())
    assert resp.json()["length"] == 64 * 16384


async def test_duplicate_response_headers_are_kept_in_order(server: str, client: httpx.AsyncClient) -> None:
    resp = await client.get(f"{server}/dup")
    assert resp.headers.get_list("x-dup") == ["first", "second"]
    assert resp.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_multi_megabyte_body_streams_in_pieces(server: str, client: httpx.AsyncClient) -> None:
    chunks = []
    async with client.stream("GET", f"{server}/big") as resp:
        assert resp.headers["content-length"] == str(len(BIG))
        async for chunk in resp.aiter_raw():
            chunks.append(chunk)
    assert b"".join(chunks) == BIG
    assert len(chunks) > 1  # handed over as it arrives, not read whole first
    whole = await client.get(f"{server}/big")
    assert whole.content == BIG


async def test_range_request_and_an_abandoned_stream(server: str, client: httpx.AsyncClient) -> None:
    resp = await client.get(f"{server}/range", headers={"range": "bytes=0-65535"})
    assert resp.status_code == 206 and resp.content == BIG[:65536]
    async with client.stream("GET", f"{server}/big") as resp:  # what ResultShaper._head does with a server that ignores Range
        async for _ in resp.aiter_bytes():
            break
    again = await client.get(f"{server}/range", headers={"range": "bytes=10-19"})
    assert again.content == BIG[10:20]


async def test_abandoned_streams_give_their_connections_back(server: str) -> None:
    async with httpx.AsyncClient(transport=AiohttpTransport(2)) as client:
        kept = []  # the responses stay referenced, as a caller's may: only closing frees the connection
        for _ in range(4):
            async with client.stream("GET", f"{server}/big") as resp:
                async for _ in resp.aiter_bytes():
                    break
            kept.append(resp)
        assert (await client.get(f"{server}/peer", timeout=2.0)).status_code == 200


async def test_gzip_body_is_decoded_exactly_once(server: str, client: httpx.AsyncClient) -> None:
    resp = await client.get(f"{server}/gzip")
    assert resp.headers["content-encoding"] == "gzip"
    assert resp.content == TEXT


async def test_keep_alive_reuses_one_connection(server: str, client: httpx.AsyncClient) -> None:
    ports = {(await client.get(f"{server}/peer")).text for _ in range(5)}
    assert len(ports) == 1


async def test_per_request_timeout_is_honoured(server: str, client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await client.get(f"{server}/slow", params={"s": "2"}, timeout=0.2)
    assert time.monotonic() - started < 1.5
    resp = await client.get(f"{server}/slow", params={"s": "0.3"}, timeout=2.0)
    assert resp.text == "late"


async def test_read_timeout_while_reading_the_body(server: str, client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.get(f"{server}/stall-body", params={"s": "2"}, timeout=0.3)


async def test_server_closing_mid_body_is_a_transport_error_not_a_hang(server: str, client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.TransportError):
        await asyncio.wait_for(client.get(f"{server}/cut"), timeout=5)
    assert (await client.get(f"{server}/peer")).status_code == 200  # the pool is still usable


async def test_not_http_is_unsupported_protocol(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get("ftp://127.0.0.1/file")


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
async def test_adapter_request_failure_classes(server: str, client: httpx.AsyncClient, path: str | None, job_id: str | None, failure: FailureClass) -> None:
    url = refused_url() if path is None else f"{server}{path}"
    with pytest.raises(ProviderError) as err:
        await adapter(client, server, request_s=0.3).request("GET", url, deadline=time.monotonic() + 5, job_id=job_id)
    assert err.value.failure is failure, err.value


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
    request = httpx.Request("GET", "http://h/")
    with pytest.raises(expected), _httpx_errors(request):
        raise raised


def test_errors_while_reading_the_body_are_read_errors() -> None:
    request = httpx.Request("GET", "http://h/")
    with pytest.raises(httpx.ReadError), _httpx_errors(request, reading=True):
        raise aiohttp.ClientOSError(104, "Connection reset by peer")


async def test_one_session_per_loop_closed_on_aclose(server: str) -> None:
    transport = AiohttpTransport(4)
    client = httpx.AsyncClient(transport=transport)
    await client.get(f"{server}/peer")
    await client.get(f"{server}/peer")
    sessions = list(transport._sessions.values())
    assert len(sessions) == 1 and not sessions[0].closed
    await client.aclose()
    assert sessions[0].closed and not transport._sessions


async def test_aclose_does_not_wait_forever_for_a_socket_that_will_not_close(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    transport = AiohttpTransport(4)
    client = httpx.AsyncClient(transport=transport)
    await client.get(f"{server}/peer")
    (session,) = transport._sessions.values()

    async def never_closes() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(session, "close", never_closes)
    monkeypatch.setattr("gateway.net.aiohttp_transport.CLOSE_TIMEOUT_S", 0.2)
    started = time.monotonic()
    await asyncio.wait_for(client.aclose(), timeout=5)
    assert time.monotonic() - started < 2
    await session.connector.close()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        ("aiohttp", {}, AiohttpTransport),
        ("aiohttp", {"KLEIN_UPSTREAM_CLIENT": "httpx"}, ShardedTransport),
        ("httpx", {}, ShardedTransport),
        ("httpx", {"KLEIN_UPSTREAM_CLIENT": "aiohttp"}, AiohttpTransport),
    ],
)
async def test_upstream_client_choice(configured: str, env: dict[str, str], expected: type) -> None:
    full_env = {**ENV, **env}
    config = load_config(PROVIDERS_YAML, env=full_env)
    config.settings.upstream_client = configured  # type: ignore[assignment]
    gw = build_gateway(config, full_env)
    try:
        assert type(gw.clients[0]._transport) is expected
        assert type(gw.clients[1]._transport).__name__ == "PinnedTransport"  # reference downloads stay on httpx
    finally:
        await gw.close()


def test_shipped_default_is_aiohttp() -> None:
    assert load_config(PROVIDERS_YAML, env=ENV).settings.upstream_client == "aiohttp"


def test_unknown_upstream_client_is_a_config_error() -> None:
    env = {**ENV, "KLEIN_UPSTREAM_CLIENT": "curl"}
    with pytest.raises(ConfigError, match="KLEIN_UPSTREAM_CLIENT"):
        build_gateway(load_config(PROVIDERS_YAML, env=env), env)


async def test_a_cookie_one_provider_answer_sets_is_never_sent_on_a_later_call() -> None:
    seen: list[str | None] = []

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "session=caller-a; Path=/"}, json={"ok": True})

    config = load_config(PROVIDERS_YAML, env=ENV)
    gw = build_gateway(config, ENV, transport=httpx.MockTransport(provider))
    try:
        upstream = gw.clients[0]
        for _ in range(2):
            answer = await upstream.post("http://provider.test/v1/run", json={})
            assert answer.headers["set-cookie"].startswith("session=")
        assert seen == [None, None]
        assert not list(upstream.cookies.jar)
    finally:
        await gw.close()


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
    async with httpx.AsyncClient(transport=AiohttpTransport(4, ssl_context=ssl.create_default_context(cafile=cert))) as client:
        answer = await client.post(f"{base}/echo", content=b"over tls")
    assert answer.status_code == 201
    assert answer.json()["body"] == "over tls"


async def test_https_with_an_untrusted_certificate_is_unreachable_not_sent(tls_server: tuple[str, str]) -> None:
    base, _ = tls_server
    async with httpx.AsyncClient(transport=AiohttpTransport(4)) as client:  # the default trust store does not know it
        with pytest.raises(httpx.ConnectError):
            await client.post(f"{base}/echo", content=b"secret prompt")
        with pytest.raises(ProviderError) as caught:
            await adapter(client, base).request("POST", f"{base}/echo", deadline=time.monotonic() + 5, content=b"secret prompt")
    assert caught.value.failure is FailureClass.UNREACHABLE
