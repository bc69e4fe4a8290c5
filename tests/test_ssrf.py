"""Caller reference URLs never lead into a private network, at parse time or at fetch time.

Parse time: the whole gateway answers 400 `invalid_image_url` (never 500, never
a call to a hosted provider) for every non-public host however it is spelt,
with names resolved by a scripted resolver. Fetch time: `PinnedTransport`
resolves once and connects to the checked address; a real HTTP server on
loopback shows the request arriving with the original Host header while the
resolver has started answering 127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, ClassVar

import httpcore
import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from gateway.dispatch.references import fetch_reference, parse_reference
from gateway.domain.errors import InvalidRequest
from gateway.domain.job import ReferenceImage
from gateway.net.addresses import HostRefused, embedded_ipv4, is_public, literal_address, loose_ipv4
from gateway.net.pinning import HostUnresolved, PinnedTransport, SystemResolver
from tests.gateway_support import ScriptedResolver, make_app, png_bytes

FAL = "http://fal.test"
PUBLIC_V4 = "93.184.216.34"


NAMES: dict[str, list[list[str]] | str] = {
    "public.test": [[PUBLIC_V4]],
    "public6.test": [["2606:4700::1111", PUBLIC_V4]],
    "rebind.test": [["127.0.0.1"]],
    "metadata.test": [["169.254.169.254"]],
    "mixed.test": [[PUBLIC_V4, "10.0.0.7"]],
    "mapped.test": [["::ffff:10.0.0.7"]],
    "nat64.test": [["64:ff9b::a9fe:a9fe"]],
    "slow.test": "timeout",
}


# ---- the address rule --------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        (PUBLIC_V4, True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.1.1", False),  # multicast
        ("240.0.0.1", False),  # reserved
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:8.8.8.8", True),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::10.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::c0a8:101", False),  # NAT64 of 192.168.1.1
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("64:ff9b:1::808:808", False),  # local-use NAT64 prefix, refused whole
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("2001:0:7f00:1:8000:63bf:3fff:fdd2", False),  # Teredo, server 127.0.0.1
    ],
)
def test_is_public_judges_ipv4_in_every_ipv6_form(address, public):
    assert is_public(ip_address(address)) is public


@pytest.mark.parametrize(
    ("address", "carried"),
    [
        ("::ffff:10.0.0.7", ["10.0.0.7"]),
        ("::10.0.0.7", ["10.0.0.7"]),
        ("64:ff9b::a00:7", ["10.0.0.7"]),
        ("2002:a00:7::1", ["10.0.0.7"]),
        ("2606:4700::1111", []),
    ],
)
def test_embedded_ipv4_finds_the_address_an_ipv6_form_carries(address, carried):
    assert [str(a) for a in embedded_ipv4(IPv6Address(address))] == carried


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2852039166", "169.254.169.254"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("10.0.0.1.", "10.0.0.1"),
        ("example.com", None),
        ("1.example", None),
    ],
)
def test_loose_ipv4_reads_every_spelling_a_url_parser_accepts(host, address):
    got = loose_ipv4(host)
    assert (str(got) if got is not None else None) == address


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.1.1.1", "1.2.65536", "09.1.1.1", "0xg1.1.1.1", "example.123"])
def test_hosts_ending_in_a_number_that_are_no_address_are_refused(host):
    with pytest.raises(HostRefused):
        loose_ipv4(host)


def test_a_public_address_in_a_nonstandard_spelling_is_refused_too():
    assert literal_address("8.8.8.8") == IPv4Address("8.8.8.8")
    with pytest.raises(HostRefused, match="dotted decimal"):
        literal_address("134744072")  # 8.8.8.8


# ---- parse time, through the whole gateway ----------------------------------

REFUSED_AT_PARSE = [
    # literal and disguised IPv4
    "http://127.0.0.1/x.png",
    "http://2852039166/x.png",
    "http://0x7f000001/x.png",
    "http://0177.0.0.1/x.png",
    "http://127.1/x.png",
    "http://0/x.png",
    "http://0x7f.1/x.png",
    "http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/x.png",  # fullwidth 127.0.0.1
    "http://10.0.0.5/x.png",
    "http://100.64.0.1/x.png",
    "http://134744072/x.png",  # 8.8.8.8, but not written as such
    "http://1.2.3.4.5/x.png",
    "http://256.1.1.1/x.png",
    # IPv6 and IPv4 inside it
    "http://[::1]/x.png",
    "http://[::ffff:127.0.0.1]/x.png",
    "http://[::ffff:7f00:1]/x.png",
    "http://[::127.0.0.1]/x.png",
    "http://[64:ff9b::a9fe:a9fe]/x.png",
    "http://[64:ff9b::7f00:1]/x.png",
    "http://[64:ff9b:1::a9fe:a9fe]/x.png",
    "http://[2002:a9fe:a9fe::1]/x.png",
    "http://[2002:7f00:1::1]/x.png",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x.png",
    "http://[fe80::1%25eth0]/x.png",
    "http://[fd00::1]/x.png",
    # names
    "http://localhost/x.png",
    "http://LOCALHOST./x.png",
    "http://api.localhost/x.png",
    "http://rebind.test/x.png",
    "https://metadata.test/latest/meta-data",
    "http://mixed.test/x.png",
    "http://mapped.test/x.png",
    "http://nat64.test/x.png",
    "http://no-such-name.test/x.png",
    # malformed (parse-time part of the bad-URL defect)
    "http://[::1/x.png",
    "http://host.test:99999/x.png",
    "http://host.test:abc/x.png",
    "http://host.test:0/x.png",
    "http://[not-an-address]/x.png",
]

ACCEPTED_AT_PARSE = [
    f"http://{PUBLIC_V4}/x.png",
    "https://public.test/x.png",
    "https://public6.test:8443/x.png",
    "http://[2606:4700::1111]/x.png",
    "http://[2002:808:808::1]/x.png",
    "http://[64:ff9b::808:808]/x.png",
]


def fal_failing() -> respx.Router:
    router = respx.Router(assert_all_called=False)
    router.route(url__startswith=FAL).mock(return_value=httpx.Response(500, json={"detail": "runner crashed"}))
    return router


async def post_edit(url: str, router: respx.Router, resolver: ScriptedResolver) -> httpx.Response:
    app = make_app({"FAL_KEY": "fal-id:fal-secret-value", "KLEIN_FAL_BASE_URL": FAL}, transport=httpx.MockTransport(router.async_handler))
    app.state.gateway.resolver = resolver
    async with AsyncTestClient(app) as client:
        return await client.post("/v1/images/edits", json={"prompt": "make it night", "images": [url], "provider": {"only": ["fal"]}})


@pytest.mark.parametrize("url", REFUSED_AT_PARSE)
async def test_non_public_or_malformed_reference_urls_are_refused_at_parse_time(url):
    router = fal_failing()
    answer = await post_edit(url, router, ScriptedResolver(NAMES))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_image_url"
    assert error["param"] == "images[0]"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("reference URL")
    assert not router.calls, "a refused URL reached a hosted provider"


@pytest.mark.parametrize("url", ACCEPTED_AT_PARSE)
async def test_public_reference_urls_are_passed_on_to_the_provider(url):
    router = fal_failing()
    answer = await post_edit(url, router, ScriptedResolver(NAMES))
    assert answer.status_code != 400, answer.text
    assert router.calls and url in router.calls[0].request.content.decode()


async def test_a_resolver_that_does_not_answer_is_a_retryable_503_not_a_guess():
    router = fal_failing()
    answer = await post_edit("https://slow.test/x.png", router, ScriptedResolver(NAMES))
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "reference_dns_unavailable"
    assert answer.headers["x-should-retry"] == "true"
    assert not router.calls


async def test_localhost_is_refused_with_the_real_resolver_too():
    router = fal_failing()
    answer = await post_edit("http://localhost:8080/x.png", router, SystemResolver())  # type: ignore[arg-type]
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_image_url"


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://h.test:99999/x.png", "http://h.test:abc/x.png"])
def test_parse_reference_refuses_malformed_urls_with_a_400(url):
    with pytest.raises(InvalidRequest) as info:
        parse_reference(url, "images[0]")
    assert info.value.code == "invalid_image_url" and info.value.status == 400


# ---- fetch time: pinned to the checked address -------------------------------


class _ImageHandler(BaseHTTPRequestHandler):
    body = png_bytes(64, 64)
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers.get("host", ""))
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_server():
    _ImageHandler.hosts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class ToLoopback(httpcore.AnyIOBackend):
    """Records the address the pinned backend asked for, then reaches the test server on loopback."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.asked: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        self.asked.append((host, port))
        return await super().connect_tcp("127.0.0.1", self.port, timeout=timeout)


async def test_fetch_connects_to_the_address_it_checked_while_dns_rebinds(image_server):
    """First answer public, every later one 127.0.0.1: one lookup, and the socket goes to the public address."""
    resolver = ScriptedResolver({"cdn.test": [[PUBLIC_V4], ["127.0.0.1"]]})
    inner = ToLoopback(image_server.server_address[1])
    async with httpx.AsyncClient(transport=PinnedTransport(resolver, network_backend=inner), follow_redirects=False) as client:
        ref = await fetch_reference(ReferenceImage(content_type="application/octet-stream", url="http://cdn.test:8080/a.png"), client)
    assert ref.data == _ImageHandler.body and (ref.width, ref.height) == (64, 64)
    assert resolver.calls == ["cdn.test"]
    assert inner.asked == [(PUBLIC_V4, 8080)]
    assert _ImageHandler.hosts == ["cdn.test:8080"]


@pytest.mark.parametrize(
    ("answers", "why"),
    [
        ([["127.0.0.1"]], "127.0.0.1"),
        ([[PUBLIC_V4, "10.0.0.7"]], "10.0.0.7"),
        ([["64:ff9b::7f00:1"]], "64:ff9b::7f00:1"),
        ([["2002:a9fe:a9fe::1"]], "2002:a9fe:a9fe::1"),
    ],
)
async def test_fetch_never_opens_a_socket_to_a_name_that_resolves_privately(image_server, answers, why):
    resolver = ScriptedResolver({"cdn.test": answers})
    inner = ToLoopback(image_server.server_address[1])
    async with httpx.AsyncClient(transport=PinnedTransport(resolver, network_backend=inner)) as client:
        with pytest.raises(InvalidRequest, match="public address") as info:
            await fetch_reference(ReferenceImage(content_type="application/octet-stream", url="http://cdn.test/a.png"), client)
    assert info.value.code == "invalid_image_url"
    assert why in info.value.message
    assert inner.asked == [] and _ImageHandler.hosts == []


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png", "http://[::ffff:127.0.0.1]/a.png", "http://2130706433/a.png", "http://h.test:99999/a.png"])
async def test_fetch_refuses_literal_non_public_hosts_before_any_lookup(url):
    resolver = ScriptedResolver({})
    async with httpx.AsyncClient(transport=PinnedTransport(resolver)) as client:
        with pytest.raises(InvalidRequest):
            await fetch_reference(ReferenceImage(content_type="application/octet-stream", url=url), client)
    assert resolver.calls == []


def self_signed(tmp_path, name: str) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.mark.parametrize(("cert_name", "fetched"), [("cdn.test", True), ("other.test", False)])
async def test_tls_to_the_pinned_address_still_checks_the_certificate_for_the_name(tmp_path, cert_name, fetched):
    """The socket goes to the checked IP, but SNI and the certificate check use the URL's host."""
    cert, key = self_signed(tmp_path, cert_name)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_side.sni_callback = lambda sock, name, ctx: names.append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.socket = server_side.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ImageHandler.hosts = []
    try:
        trusted = ssl.create_default_context(cafile=cert)
        resolver = ScriptedResolver({"cdn.test": [[PUBLIC_V4]]})
        inner = ToLoopback(server.server_address[1])
        async with httpx.AsyncClient(transport=PinnedTransport(resolver, network_backend=inner, ssl_context=trusted)) as client:
            ref = ReferenceImage(content_type="application/octet-stream", url="https://cdn.test/a.png")
            if fetched:
                assert (await fetch_reference(ref, client)).data == _ImageHandler.body
            else:
                with pytest.raises(InvalidRequest, match="could not be fetched"):
                    await fetch_reference(ref, client)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert inner.asked == [(PUBLIC_V4, 443)]
    assert names[:1] == ["cdn.test"]
    assert _ImageHandler.hosts == (["cdn.test"] if fetched else [])


async def test_system_resolver_reads_localhost_and_reports_missing_names_as_permanent():
    resolver = SystemResolver(timeout_s=5.0)
    assert IPv4Address("127.0.0.1") in await resolver.resolve("localhost", 80)
    with pytest.raises(HostUnresolved) as info:
        await resolver.resolve("no-such-name.invalid", 80)
    assert info.value.permanent


def test_the_gateway_fetch_client_is_pinned():
    app = make_app({"FAL_KEY": "fal-id:fal-secret-value"}, transport=None)
    fetch_client = app.state.gateway.clients[1]
    assert isinstance(fetch_client._transport, PinnedTransport)
    assert not fetch_client.follow_redirects
