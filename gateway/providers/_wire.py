"""Rules for following a submitted job on a provider's API.

- Which URLs may receive our credential: a provider's response names the URLs
  to poll (fal's `status_url`, Replicate's `urls.get`). Following a URL on any
  other host would hand the key to whoever controls that host, so only URLs
  under the configured base are followed; anything else is replaced by the URL
  the adapter builds itself.
- Keeping every secret out of messages, whatever the provider echoes back:
  `provider_text` is the one way provider-written text reaches a caller.
- Patience while polling: a status GET is idempotent and the job exists, so a
  transient failure (429, 5xx, a dropped connection) is retried a few times
  before the outcome is declared unknown.
- The polling loop itself (`follow_job`): one backoff schedule, bounded by the
  deadline, shared by every adapter that follows a job (fal, Replicate,
  Runflow); each supplies only what one poll means.
- What an HTTP error status means (`classify_status`, `http_error`): one
  table for every adapter, so that a provider's own rule stands out as an
  explicit override of it rather than hiding in a copy.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway.net.wire import WireResponse
from gateway.providers._json import response_json
from gateway.providers.base import Adapter, FailureClass, ProviderError, Timeouts, parse_retry_after, sleep_until_next_poll
from gateway.redaction import mask_fragments, redact, registered_secrets, unescape

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


# Of an error body, only this much is read: the answer keeps at most `limit`
# characters anyway, and a key cut here is still masked by its fragments.
MAX_SCANNED_CHARS = 8 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def credential_forms(credential: str | None) -> tuple[str, ...]:
    """The credential and, for `id:secret` keys (fal's), each part on its own."""
    if not credential:
        return ()
    return (credential, *(p for p in credential.split(":") if p != credential))


def provider_text(text: object, credential: str | None, limit: int = 300) -> str:
    """Provider-written text made fit for a caller, a log line or a health note.

    In this order, so that no cut can leave part of a key behind: escapes are
    undone (a key written `\\u0041...` or `%41...` is still the key), every
    8-character piece of the adapter's credential or of any registered secret
    is masked in any letter case, the log scrubber's patterns run (Bearer and
    Key tokens, key shapes, key-like parameters), and only then is the text
    clipped to `limit` characters."""
    forms = credential_forms(credential)
    plain = unescape(str(text)[:MAX_SCANNED_CHARS])
    masked = mask_fragments(plain, (*forms, *registered_secrets()))
    return clip(redact(masked, forms), limit)


def clip(text: str, limit: int = 300) -> str:
    """`text` on one line, control characters dropped, at most `limit` characters."""
    text = " ".join(_CONTROL.sub(" ", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def get_patiently(
    adapter: Adapter,
    url: str,
    *,
    deadline: float,
    job_id: str,
    headers: Mapping[str, str],
    max_errors: int,
    transient: Callable[[WireResponse], bool] = lambda r: r.status_code in TRANSIENT_POLL_STATUSES,
) -> WireResponse:
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


T = TypeVar("T")


async def follow_job(poll: Callable[[], Awaitable[T | None]], *, timeouts: Timeouts, deadline: float, job_id: str, wait_first: bool) -> T:
    """Call `poll` until it returns the job's end (not None), backing off in
    between (`Timeouts.poll_interval` growing to `max_poll_interval`), never
    past the deadline: then UNKNOWN_OUTCOME with `job_id`. `poll` raises for
    an end that is a failure. `wait_first`: the job was just created, so wait
    one interval before the first poll."""
    attempt = 0
    if wait_first:
        await sleep_until_next_poll(attempt, timeouts, deadline, job_id)
        attempt += 1
    while True:
        end = await poll()
        if end is not None:
            return end
        await sleep_until_next_poll(attempt, timeouts, deadline, job_id)
        attempt += 1


def maybe_json(response: WireResponse) -> Any:
    """The JSON body, or None: for error bodies, which may be anything."""
    try:
        return response_json(response)
    except ValueError:
        return None


def as_outcome_unknown(error: ProviderError, job_id: str) -> ProviderError:
    """A poll error re-cast: the job exists and may still run (and bill), whatever the poll said."""
    return replace(error, failure=FailureClass.UNKNOWN_OUTCOME, job_id=job_id, billed=True)


# ---- what an HTTP error status means ------------------------------------------

# The shared table (docs/design.md#failure-classes): a status not named is FAILED.
STATUS_CLASSES: Mapping[int, FailureClass] = {
    **dict.fromkeys((401, 402, 403, 429, 503), FailureClass.REFUSED),  # refused before any work
    **dict.fromkeys((400, 404, 409, 413, 415, 422), FailureClass.REJECTED),  # the input's fault
}
# Once the provider holds the work, a timeout status says nothing of its end:
# the job may still run, or have run, and bill.
SUBMITTED_STATUS_CLASSES: Mapping[int, FailureClass] = {**STATUS_CLASSES, **dict.fromkeys((408, 504), FailureClass.UNKNOWN_OUTCOME)}
# The key itself was refused: the backend is down until it is fixed.
CREDENTIAL_STATUSES = frozenset({401, 403})

StatusOverrides = Mapping[int, FailureClass]


def classify_status(status: int, *, submitted: bool, overrides: StatusOverrides | None = None) -> FailureClass:
    """The failure class of an HTTP error status.

    `submitted`: the provider holds work it may run or have run (a job id
    exists, or the call itself is the work). `overrides`: a provider's own
    meaning for a status, which wins over the table."""
    if overrides and status in overrides:
        return overrides[status]
    table = SUBMITTED_STATUS_CLASSES if submitted else STATUS_CLASSES
    return table.get(status, FailureClass.FAILED)


def http_error(
    response: WireResponse,
    message: str,
    *,
    job_id: str | None = None,
    submitted: bool | None = None,
    code: str | None = None,
    billed: bool | None = None,
    overrides: StatusOverrides | None = None,
) -> ProviderError:
    """A ProviderError from an HTTP error response, with Retry-After honoured.

    `submitted` defaults to whether there is a `job_id`; `billed` to whether
    the outcome is unknown (the work may have run). A 401/403 marks the
    credentials invalid."""
    status = response.status_code
    failure = classify_status(status, submitted=bool(job_id) if submitted is None else submitted, overrides=overrides)
    return ProviderError(
        failure,
        f"HTTP {status}: {message}"[:500],
        status=status,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        job_id=job_id,
        billed=failure is FailureClass.UNKNOWN_OUTCOME if billed is None else billed,
        credentials_invalid=status in CREDENTIAL_STATUSES,
        code=code,
    )
