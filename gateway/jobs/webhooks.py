"""Webhooks: who may be called, how a delivery is signed, when it is retried.

Signatures follow the Standard Webhooks specification: `webhook-id`,
`webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64 secret after `whsec_`.
A delivery is retried on any non-2xx answer or none within the timeout, on
the configured schedule, then given up; the `webhook-id` is the same on
every try, so a receiver can drop duplicates.

URL rules (against SSRF): https only, unless the host is allowlisted; the
host must pass the gateway's one address policy (`gateway.net.addresses`,
the same one reference URLs pass) unless allowlisted by name, address or
CIDR. At submit the name is resolved and every address judged; at delivery
the client's `PinnedTransport` resolves once more, judges again and connects
to the very address it judged, so DNS cannot be switched under us between
the check and the call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpcore
import httpx

from gateway.domain.errors import GatewayError, InvalidRequest
from gateway.net.addresses import HostRefused, refuse_unless_public_host
from gateway.net.allowlist import Allowlist
from gateway.net.pinning import HostUnresolved, PinnedTransport, Resolver, SystemResolver, public_addresses

__all__ = ["Allowlist", "WebhookSecretError", "check_url", "delivery_client", "next_delay", "parse_secret", "refusal_at_delivery", "sign", "signed_headers", "vet_url"]

SECRET_PREFIX = "whsec_"
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


def _bad(why: str) -> InvalidRequest:
    return InvalidRequest(f"webhook_url {why}", param="webhook_url", code="invalid_webhook_url")


def split_url(url: object, allow: Allowlist) -> tuple[str, int]:
    """The host and port a webhook URL names, if its shape may be called
    (before any address is judged); else a 400 that says why."""
    if not isinstance(url, str) or len(url) > 2048:
        raise _bad("must be a URL of at most 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        reason = "its port must be a number from 1 to 65535" if "port" in str(exc).lower() else "it is malformed"
        raise _bad(f"is not a valid URL: {reason}") from None
    host = parts.hostname or ""
    if parts.scheme not in _DEFAULT_PORTS or not host:
        raise _bad("must be an https URL")
    if port == 0:
        raise _bad("is not a valid URL: its port must be a number from 1 to 65535")
    if parts.username or parts.password:
        raise _bad("must not carry credentials")
    if parts.scheme != "https" and not allow.permits_host(host):
        raise _bad("must be https (or its host allowlisted)")
    return host, port or _DEFAULT_PORTS[parts.scheme]


def check_url(url: object, allow: Allowlist) -> str:
    """`url` if its shape and literal host may be called, else a 400 that says
    why; a name is judged by what it resolves to (`vet_url`)."""
    host, _ = split_url(url, allow)
    try:
        refuse_unless_public_host(host, allow)
    except HostRefused as exc:
        raise _bad(f"must point at a public address ({exc}); allowlist the host to use it") from None
    assert isinstance(url, str)
    return url


async def vet_url(url: object, allow: Allowlist, resolver: Resolver) -> str:
    """`url` if a webhook may be sent there now: its shape, and every address
    its host resolves to, pass the address policy. A name that does not exist
    is a 400; a resolver that does not answer in time a 503 (retryable)."""
    host, port = split_url(url, allow)
    try:
        await public_addresses(host, port, resolver, allow)
    except HostRefused as exc:
        raise _bad(f"must point at a public address ({exc}); allowlist the host to use it") from None
    except HostUnresolved as exc:
        if exc.permanent:
            raise _bad(f"host {exc}") from None
        raise GatewayError(f"webhook_url host {exc}; retry shortly", status=503, code="webhook_dns_unavailable", param="webhook_url", retryable=True, retry_after=1) from None
    assert isinstance(url, str)
    return url


async def refusal_at_delivery(url: str, allow: Allowlist, resolver: Resolver | None = None) -> str | None:
    """Why a delivery to `url` must not be made (the policy refuses it, or its
    name does not resolve), or None when it may. The delivery itself connects
    through a `PinnedTransport`, which judges the address it connects to."""
    try:
        await vet_url(url, allow, resolver or SystemResolver())
    except GatewayError as exc:
        return exc.message
    return None


def delivery_client(resolver: Resolver, allow: Allowlist, network_backend: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncClient:
    """The client webhooks are posted with: it resolves each receiver once,
    judges every address (allowlist included) and connects to the judged one;
    no redirects, no proxy from the environment."""
    transport = PinnedTransport(resolver, network_backend=network_backend, allow=allow)
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, headers={"user-agent": "klein-gateway/0.1 webhooks"})


def next_delay(schedule: Sequence[float], attempts: int) -> float | None:
    """Seconds before the next try after `attempts` failed ones; None: give up."""
    return schedule[attempts - 1] if 1 <= attempts <= len(schedule) else None
