"""Rules for following a submitted job on a provider's API.

- Which URLs may receive our credential: a provider's response names the URLs
  to poll (fal's `status_url`, Replicate's `urls.get`). Following a URL on any
  other host would hand the key to whoever controls that host, so only URLs
  under the configured base are followed; anything else is replaced by the URL
  the adapter builds itself.
- Keeping the credential out of messages, whatever the provider echoes back.
- Patience while polling: a status GET is idempotent and the job exists, so a
  transient failure (429, 5xx, a dropped connection) is retried a few times
  before the outcome is declared unknown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from gateway.providers.base import Adapter, FailureClass, ProviderError, sleep_until_next_poll

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}

# Statuses worth another status poll rather than giving up on a job that exists.
TRANSIENT_POLL_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def _origin(url: str) -> tuple[str, str, int | None, str] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.username or parts.password:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port, parts.path


def same_origin(url: str, base: str) -> bool:
    """True when `url` has the base's scheme, host and port and lies under its path."""
    got, want = _origin(url), _origin(base)
    if got is None or want is None or got[:3] != want[:3]:
        return False
    prefix = want[3].rstrip("/")
    return not prefix or got[3] == prefix or got[3].startswith(prefix + "/")


def trusted_url(candidate: object, base: str, fallback: str, *, what: str = "URL") -> str:
    """The provider's URL if it stays under `base`; otherwise our own `fallback`."""
    if isinstance(candidate, str) and candidate and same_origin(candidate, base):
        return candidate
    if candidate:
        log.warning("provider returned a %s outside the configured base URL; using the rebuilt one", what)
    return fallback


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of the secret (and of its parts, for `id:secret` keys) masked."""
    if not secret:
        return text
    for part in (secret, *secret.split(":")):  # the whole first, then the parts of `id:secret` keys
        if len(part) >= 4:
            text = text.replace(part, "***")
    return text


def clip(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def get_patiently(
    adapter: Adapter,
    url: str,
    *,
    deadline: float,
    job_id: str,
    headers: Mapping[str, str],
    max_errors: int,
    transient: Callable[[httpx.Response], bool] = lambda r: r.status_code in TRANSIENT_POLL_STATUSES,
) -> httpx.Response:
    """GET while following a job, waiting out up to `max_errors` consecutive transient failures.

    Returns the first answer that is not transient (success or a real error).
    Raises UNKNOWN_OUTCOME (with `job_id`) past the deadline or once patience runs out."""
    failures = 0
    while True:
        try:
            response = await adapter.request("GET", url, deadline=deadline, job_id=job_id, headers=dict(headers))
        except ProviderError as exc:
            if exc.failure is not FailureClass.UNKNOWN_OUTCOME or time.monotonic() >= deadline or failures >= max_errors:
                raise
        else:
            if not transient(response):
                return response
            if failures >= max_errors:
                raise ProviderError(
                    FailureClass.UNKNOWN_OUTCOME,
                    f"HTTP {response.status_code} while following the job, repeatedly",
                    status=response.status_code,
                    job_id=job_id,
                    billed=True,
                )
        await sleep_until_next_poll(failures, adapter.settings.timeouts, deadline, job_id)
        failures += 1


def maybe_json(response: httpx.Response) -> Any:
    """The JSON body, or None: for error bodies, which may be anything."""
    try:
        return response.json()
    except ValueError:
        return None


def as_outcome_unknown(error: ProviderError, job_id: str) -> ProviderError:
    """A poll error re-cast: the job exists and may still run (and bill), whatever the poll said."""
    return replace(error, failure=FailureClass.UNKNOWN_OUTCOME, job_id=job_id, billed=True)


T = TypeVar("T")


def parse_options(cls: type[T], options: Mapping[str, Any] | None, provider: str) -> T:
    """An adapter's options dataclass from providers.yaml; unknown names are refused by name."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(cls.__dataclass_fields__))  # type: ignore[attr-defined]  # T is always a dataclass; type[T] cannot say so
    if unknown:
        raise ValueError(f"{provider}: unknown option(s): {', '.join(unknown)}")
    return cls(**opts)
