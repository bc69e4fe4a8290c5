"""Webhooks: who may be called, how a delivery is signed, when it is retried.

Signatures follow the Standard Webhooks specification: `webhook-id`,
`webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64 secret after `whsec_`.
A delivery is retried on any non-2xx answer or none within the timeout, on
the configured schedule, then given up; the `webhook-id` is the same on
every try, so a receiver can drop duplicates.

URL rules (against SSRF): https only, unless the host is allowlisted; a host
that is, or resolves to, a private, loopback, link-local or reserved address
is refused unless allowlisted (by name, address or CIDR). The name is
resolved again before each delivery, so DNS cannot be switched under us
between the check and the call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.domain.errors import InvalidRequest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SECRET_PREFIX = "whsec_"


class WebhookSecretError(ValueError):
    """KLEIN_WEBHOOK_SECRET is not `whsec_<base64>`."""


def parse_secret(value: str) -> bytes:
    raw = value.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSecretError("KLEIN_WEBHOOK_SECRET must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise WebhookSecretError("KLEIN_WEBHOOK_SECRET must hold at least 16 bytes of key")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
        "content-type": "application/json",
    }


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Hosts and networks a webhook may reach even when not https or not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def permits_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.hosts:
            return True
        address = _address(host)
        return address is not None and self.permits_address(address)

    def permits_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (address.is_private or address.is_loopback or address.is_link_local or address.is_reserved or address.is_multicast or address.is_unspecified)


def check_url(url: object, allow: Allowlist) -> str:
    """`url` if a webhook may be sent there, else a 400 that says why."""

    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"webhook_url {why}", param="webhook_url", code="invalid_webhook_url")

    if not isinstance(url, str) or len(url) > 2048:
        raise bad("must be a URL of at most 2048 characters")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise bad("must be an https URL")
    if parts.username or parts.password:
        raise bad("must not carry credentials")
    if allow.permits_host(host):
        return url
    if parts.scheme != "https":
        raise bad("must be https (or its host allowlisted)")
    address = _address(host)
    if host == "localhost" or host.endswith(".localhost") or (address is not None and not is_public(address)):
        raise bad("points at a private or loopback address; allowlist it to use it")
    return url


async def refusal_at_delivery(url: str, allow: Allowlist) -> str | None:
    """Why a delivery to `url` must not be made now (its name resolves to a
    private address that is not allowlisted), or None when it may."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if allow.permits_host(host):
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443)
    except OSError:
        return None  # unresolvable: the delivery fails like any unreachable receiver
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not is_public(address) and not allow.permits_address(address):
            return f"{host} resolves to a non-public address"
    return None


def next_delay(schedule: Sequence[float], attempts: int) -> float | None:
    """Seconds before the next try after `attempts` failed ones; None: give up."""
    return schedule[attempts - 1] if 1 <= attempts <= len(schedule) else None
