"""One address policy for every caller URL: reference images and webhooks refuse the same spellings.

The table below is judged by the policy itself (`public_addresses`), by the
reference check on arrival (`parse_reference` then `vet_reference_hosts`) and
by the webhook check at submit (`vet_url`); a host refused by one is refused
by all. Names are answered by a stub resolver, never by DNS. Webhook delivery
is shown to connect to the address it judged, with a resolver whose second
answer differs from its first, and to give up (recorded) a delivery that
cannot be made instead of retrying it forever.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpcore
import pytest

from gateway.config import GatewaySettings
from gateway.dispatch.references import parse_reference, vet_reference_hosts
from gateway.domain.errors import GatewayError, InvalidRequest
from gateway.jobs.model import JobRecord, Webhook, new_job_id
from gateway.jobs.service import open_jobs
from gateway.jobs.webhooks import Allowlist, check_url, delivery_client, vet_url
from gateway.jobs.worker import JobWorker
from gateway.net.addresses import HostRefused
from gateway.net.pinning import HostUnresolved, public_addresses
from gateway.observability.metrics import GatewayMetrics
from tests.gateway_support import ScriptedResolver

PUBLIC_V4 = "93.184.216.34"


NAMES = {
    "public.test": [[PUBLIC_V4, "2606:4700::1111"]],
    "private.test": [["10.0.0.7"]],
    "mixed.test": [[PUBLIC_V4, "192.0.0.8"]],
    "sixtofour.test": [["2002:7f00:1::"]],
}

# (URL host as a caller writes it, allowed)
POLICY = [
    # public: allowed
    ("8.8.8.8", True),
    ("[2606:4700::1111]", True),
    ("public.test", True),  # a public name, resolved by the stub
    ("[2002:808:808::]", True),  # 6to4 of 8.8.8.8
    ("[64:ff9b::808:808]", True),  # NAT64 of 8.8.8.8
    # loopback, private, link-local, CGNAT, IETF-reserved
    ("127.0.0.1", False),
    ("[::1]", False),
    ("10.0.0.1", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("169.254.1.1", False),
    ("[fe80::1]", False),
    ("[fc00::1]", False),
    ("100.64.0.1", False),  # carrier-grade NAT
    ("100.127.255.254", False),
    ("192.0.0.8", False),  # IETF protocol assignments; global to Python 3.11's is_global
    ("192.0.0.1", False),
    ("198.18.0.1", False),  # benchmarking
    ("240.0.0.1", False),
    ("0.0.0.0", False),
    # cloud metadata
    ("169.254.169.254", False),
    ("100.100.100.200", False),
    ("[fd00:ec2::254]", False),
    # IPv4 inside IPv6
    ("[::ffff:127.0.0.1]", False),
    ("[::ffff:169.254.169.254]", False),
    ("[2002:7f00:1::]", False),  # 6to4 of 127.0.0.1
    ("[2002:a9fe:a9fe::]", False),  # 6to4 of 169.254.169.254
    ("[2002:6464:64c8::]", False),  # 6to4 of 100.100.100.200
    ("[64:ff9b::7f00:1]", False),  # NAT64 of 127.0.0.1
    ("[64:ff9b::a9fe:a9fe]", False),  # NAT64 of 169.254.169.254
    # IPv4 spelt as inet_aton reads it
    ("127.1", False),
    ("2130706433", False),
    ("0x7f000001", False),
    ("0177.0.0.1", False),
    ("134744072", False),  # 8.8.8.8, but not in dotted decimal
    # names
    ("127.0.0.1.", False),  # a trailing dot goes to DNS
    ("public.test.", False),
    ("localhost", False),
    ("api.localhost", False),
    ("nxdomain.test", False),  # a failed lookup is a refusal
    ("private.test", False),
    ("mixed.test", False),  # one non-public answer is enough
    ("sixtofour.test", False),
]


async def judged_by_policy(host: str) -> None:
    hostname = urlsplit(f"https://{host}/").hostname or ""
    try:
        await public_addresses(hostname, 443, ScriptedResolver(NAMES))
    except (HostRefused, HostUnresolved) as exc:
        raise InvalidRequest(str(exc)) from exc


async def judged_as_reference(host: str) -> None:
    ref = parse_reference(f"https://{host}/cat.png", "images[0]")
    await vet_reference_hosts([ref], ScriptedResolver(NAMES))


async def judged_as_webhook(host: str) -> None:
    await vet_url(f"https://{host}/hook", Allowlist(), ScriptedResolver(NAMES))


CALLERS: dict[str, Callable[[str], Awaitable[None]]] = {"policy": judged_by_policy, "reference": judged_as_reference, "webhook": judged_as_webhook}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize(("host", "allowed"), POLICY)
async def test_every_caller_url_is_judged_by_the_same_address_policy(caller: str, host: str, allowed: bool) -> None:
    judge = CALLERS[caller]
    if allowed:
        await judge(host)
        return
    with pytest.raises(InvalidRequest) as caught:
        await judge(host)
    if caller != "policy":
        assert caught.value.status == 400
        assert caught.value.param == ("images[0]" if caller == "reference" else "webhook_url")
        assert caught.value.code == ("invalid_image_url" if caller == "reference" else "invalid_webhook_url")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://[::1", "malformed"),
        ("https://[::1/hook", "malformed"),
        ("https://example.com:99999/hook", "port"),
        ("https://example.com:0/hook", "port"),
        ("https://example.com:abc/hook", "port"),
    ],
)
async def test_a_webhook_url_that_cannot_be_parsed_is_a_400_not_a_500(url: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why) as at_check:
        check_url(url, Allowlist())
    with pytest.raises(InvalidRequest, match=why) as at_submit:
        await vet_url(url, Allowlist(), ScriptedResolver(NAMES))
    for caught in (at_check, at_submit):
        assert caught.value.param == "webhook_url" and caught.value.code == "invalid_webhook_url"


async def test_a_webhook_host_whose_resolver_times_out_is_a_retryable_503() -> None:
    class Slow:
        async def resolve(self, host: str, port: int) -> list[Any]:
            raise HostUnresolved(host, permanent=False)

    with pytest.raises(GatewayError) as caught:
        await vet_url("https://hooks.example/x", Allowlist(), Slow())
    assert caught.value.status == 503 and caught.value.retryable


@pytest.mark.parametrize(
    ("allow", "url", "allowed"),
    [
        (["127.0.0.1"], "http://127.0.0.1:9000/hook", True),
        (["127.0.0.1"], "http://127.1:9000/hook", False),  # allowlisted only in its standard spelling
        (["127.0.0.1"], "http://127.0.0.1.:9000/hook", False),  # a trailing dot is never allowlisted
        (["127.0.0.1"], "https://[::ffff:127.0.0.1]/hook", False),
        (["10.20.0.0/16"], "https://private.test/hook", False),  # resolves to 10.0.0.7, outside the CIDR
        (["10.0.0.0/8"], "https://private.test/hook", True),
        (["private.test"], "http://private.test/hook", True),  # allowlisted by name
    ],
)
async def test_the_webhook_allowlist_is_the_only_way_past_the_policy(allow: list[str], url: str, allowed: bool) -> None:
    allowlist = Allowlist.parse(allow)
    if allowed:
        assert await vet_url(url, allowlist, ScriptedResolver(NAMES)) == url
    else:
        with pytest.raises(InvalidRequest):
            await vet_url(url, allowlist, ScriptedResolver(NAMES))


# ---- delivery ----------------------------------------------------------------


class Receiver(httpcore.AsyncNetworkBackend):
    """Records the address each connection was opened to and answers every request 204."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        self.asked.append((host, port))
        return _Answer204()

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise AssertionError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        pass


class _Answer204(httpcore.AsyncNetworkStream):
    def __init__(self) -> None:
        self.sent = b""
        self.answered = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self.answered:
            return b""
        self.answered = True
        return b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.sent += buffer

    async def aclose(self) -> None:
        pass

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return self  # the receiver is on the test's side of TLS: what matters is where the socket went


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


async def deliver_once(url: str, resolver: ScriptedResolver, receiver: Receiver) -> Webhook:
    """One delivery of a finished job's webhook through the worker, with the production client."""
    settings = GatewaySettings(webhook_retry_delays_s=[5.0])
    jobs = open_jobs(settings, {"KLEIN_WEBHOOK_SECRET": SECRET})
    record = JobRecord(id=new_job_id(), owner="o", route="generations", job={}, base_url="", created=time.time(), status="succeeded", webhook=Webhook(url))
    await jobs.store.create(record)
    worker = JobWorker(SimpleNamespace(metrics=GatewayMetrics()), jobs, webhook_client=delivery_client(resolver, jobs.allowlist, receiver), resolver=resolver)  # type: ignore[arg-type]
    try:
        await worker._deliver(record.id)
    finally:
        assert worker.webhook_client is not None
        await worker.webhook_client.aclose()
    stored = await jobs.store.get(record.id)
    assert stored is not None and stored.webhook is not None
    return stored.webhook


async def test_webhook_delivery_connects_to_the_address_it_judged_while_dns_rebinds() -> None:
    """First answer public, every later one 127.0.0.1: one lookup, and the socket goes to the public address."""
    resolver = ScriptedResolver({"hooks.example": [[PUBLIC_V4], ["127.0.0.1"]]})
    receiver = Receiver()
    webhook = await deliver_once("https://hooks.example:8443/hook", resolver, receiver)
    assert resolver.calls == ["hooks.example"]
    assert receiver.asked == [(PUBLIC_V4, 8443)]
    assert webhook.delivered and webhook.last_status == 204


async def test_webhook_accepted_at_submit_is_given_up_when_its_name_rebinds_to_loopback() -> None:
    resolver = ScriptedResolver({"hooks.example": [[PUBLIC_V4], ["127.0.0.1"]]})
    assert await vet_url("https://hooks.example/hook", Allowlist(), resolver)  # the submit-time check sees the public answer
    receiver = Receiver()
    webhook = await deliver_once("https://hooks.example/hook", resolver, receiver)
    assert receiver.asked == []
    assert not webhook.delivered and webhook.attempts == 1
    assert webhook.refusal is not None and "127.0.0.1" in webhook.refusal


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example:99999/hook",  # stored before URLs were checked for a port in range
        "https://[::1/hook",
        "https://2002:7f00:1::/hook",
        "https://[2002:7f00:1::]/hook",
        "https://127.0.0.1./hook",
        "https://nxdomain.test/hook",
    ],
)
async def test_a_webhook_delivery_that_cannot_be_made_is_given_up_and_recorded(url: str) -> None:
    receiver = Receiver()
    webhook = await deliver_once(url, ScriptedResolver({"hooks.example": [[PUBLIC_V4]]}), receiver)
    assert receiver.asked == []
    assert not webhook.delivered and webhook.attempts == 1 and webhook.refusal
