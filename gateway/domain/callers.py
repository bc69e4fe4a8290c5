"""How a caller is named in metrics and logs: never by its key.

`caller_label(caller)` is the one place a label is made. A caller with a
configured name is labelled by that name. Otherwise the label is `key_` and
16 hex digits of HMAC-SHA256(server secret, key): stable for a key, and,
unlike a plain hash of the key, useless for confirming a guessed key offline
to anyone who can read /metrics but does not hold the secret.

The secret comes from `KLEIN_METRICS_KEY_SECRET`. Unset, each process draws a
random one at start (labels change on restart); `klein-gateway serve` draws
one for all its workers, so they agree. Set it yourself to keep labels stable
across restarts and replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Final

from gateway.settings import Settings

LABEL_SECRET_ENV: Final = "KLEIN_METRICS_KEY_SECRET"
_PROCESS_SECRET: Final = secrets.token_bytes(32)
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the key it presented and, where configured, its name."""

    key: str = field(repr=False)
    name: str | None = None


def label_secret() -> bytes:
    """The HMAC key for caller labels: `KLEIN_METRICS_KEY_SECRET`, else this process's random one."""
    configured = Settings.from_env().metrics_key_secret
    return configured.encode() if configured else _PROCESS_SECRET


def caller_label(caller: Caller) -> str:
    """The caller's configured name if it is a tidy label, else `key_` + 16 hex of HMAC-SHA256(secret, key)."""
    if caller.name and _NAME.match(caller.name):
        return caller.name
    return "key_" + hmac.new(label_secret(), caller.key.encode(), hashlib.sha256).hexdigest()[:16]
