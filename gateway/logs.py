"""Structured JSON logs: one line per request, and no secrets or prompts, ever.

`configure_logging()` installs one handler that writes each record as a JSON
object on its own line and scrubs anything that looks like a credential:
`Authorization` values, `Bearer ...` and `Key ...` tokens (fal's scheme),
OpenAI-style `sk-...`, Replicate `r8_...`, Runflow `rf_live_...`, fal's
`uuid:secret` keys, passwords in URLs, key-like query parameters, and the
exact values of configured secrets (the provider credentials and gateway keys
from the environment, see `secrets_from_env`; a backend fleet also registers
the credential of every configured backend, read from whatever variable
providers.yaml names). Scrubbing runs on the message,
its arguments, extra fields and tracebacks, so an exception that quotes a
header cannot leak it.

`RequestLogger.log()` writes the one line per request. Prompts are never
logged; with `log_prompt_length=True` the line carries the prompt's length in
characters, never its text.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import sys
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final, TextIO
from urllib.parse import unquote

from gateway.providers import credential_env_names

REDACTED: Final = "[REDACTED]"

GATEWAY_KEYS_ENV: Final = "KLEIN_GATEWAY_KEYS"  # comma-separated caller keys
# The gateway's own secrets: the /metrics token, the caller-label and image-URL signing keys.
GATEWAY_SECRET_ENV_VARS: Final = ("KLEIN_METRICS_TOKEN", "KLEIN_METRICS_KEY_SECRET", "KLEIN_URL_SIGNING_KEY")
PROMPT_LENGTH_ENV: Final = "KLEIN_LOG_PROMPT_LENGTH"  # opt-in: log prompt length (never text)

_TOKEN = r"[A-Za-z0-9._~+/=:\-]"
_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # Header values, whatever the scheme: `Authorization: Key abc`, JSON or repr forms.
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\"'\n,}]+"), r"\1" + REDACTED),
    (re.compile(rf"(?i)\b(bearer|basic)\s+{_TOKEN}+"), r"\1 " + REDACTED),
    # `Key <fal key>`: only tokens with a digit, so prose like "Key rotation" survives.
    (re.compile(rf"\b(Key|Token)\s+(?={_TOKEN}*\d){_TOKEN}{{8,}}"), r"\1 " + REDACTED),
    # Provider key shapes.
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), REDACTED),
    (re.compile(r"\br8_[A-Za-z0-9]{8,}"), REDACTED),
    (re.compile(r"\brf_(?:live|test)_[A-Za-z0-9_\-]{4,}"), REDACTED),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}:[0-9a-fA-F]{16,}"), REDACTED),
    # Passwords in URLs (redis://:pw@host), key-like query parameters and fields.
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|secret|password|signature|sig)=)[^&\s\"']+"), r"\1" + REDACTED),
    # A field's value: always after `=` or in quotes (`token=x`, `"password": "x"`);
    # after a bare colon only when it looks like a token, not a word, so that
    # prose such as "no credential: set FAL_KEY" keeps its instruction.
    (re.compile(r"(?i)(\b(?:api[_-]?key|secret|password|token|credential)[\"']?\s*(?:=\s*[\"']?|:\s*[\"']))[^\"'\s,}&]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)(\b(?:api[_-]?key|secret|password|token|credential)[\"']?\s*:\s*)(?=[^\"'\s,}&]*[0-9_\-./+=~])[^\"'\s,}&]+"), r"\1" + REDACTED),
)

# Every pattern above needs one of these in the text: a string without any is
# passed over without running them (most fields of a request line).
_TRIGGER: Final = re.compile(r"(?i)authoriz|bearer|basic|key|token|sk-|r8_|rf_|://|[?&]|secret|password|credential|[0-9a-f]{8}-")
# The same test for ASCII text, as substring checks of its lower-case form (a
# tenth of the regex's time on a request line). Outside ASCII, IGNORECASE also
# folds letters such as U+017F (long s) and U+212A (Kelvin), so the regex decides.
_TRIGGER_WORDS: Final = ("authoriz", "bearer", "basic", "key", "token", "sk-", "r8_", "rf_", "://", "?", "&", "secret", "password", "credential")
_HEX_DASH: Final = re.compile(r"[0-9a-fA-F]{8}-")


def _triggered(text: str) -> bool:
    """Whether `text` holds anything one of `_PATTERNS` could match (`_TRIGGER`)."""
    if not text.isascii():
        return _TRIGGER.search(text) is not None
    low = text.lower()
    for word in _TRIGGER_WORDS:
        if word in low:
            return True
    return "-" in text and _HEX_DASH.search(text) is not None


# Extra fields whose values are never written, whatever they hold.
_NEVER_LOGGED_FIELDS: Final = frozenset(
    {
        "prompt",
        "negative_prompt",
        "revised_prompt",
        "authorization",
        "api_key",
        "key",
        "token",
        "secret",
        "password",
        "credential",
        "credentials",
        "b64_json",
        "image",
        "images",
    }
)
_MIN_SECRET_LEN: Final = 4  # shorter configured "secrets" would shred ordinary text
FRAGMENT_LEN: Final = 8  # this many characters of a secret count as the secret

_secrets: set[str] = set()
_secrets_by_length: tuple[str, ...] = ()  # longest first, so a secret containing another goes whole
_secrets_lock = threading.Lock()


def register_secrets(values: Iterable[str | None]) -> None:
    """Add values that must never appear in a log line, label or caller's answer."""
    global _secrets_by_length
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_LEN)
        _secrets_by_length = tuple(sorted(_secrets, key=len, reverse=True))


def registered_secrets() -> tuple[str, ...]:
    """Every registered secret, longest first."""
    return _secrets_by_length


@lru_cache(maxsize=64)
def _lowered(secrets: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.lower() for s in secrets)


@lru_cache(maxsize=64)
def _secret_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive alternation of the secrets, longest first."""
    return re.compile("|".join(re.escape(s) for s in secrets), re.IGNORECASE) if secrets else None


def secrets_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The configured secret values: every registered provider's credential
    variable (`Adapter.credential_env`), the caller keys and the gateway's own secrets."""
    env = os.environ if environ is None else environ
    found = [env[name] for name in (*credential_env_names(), *GATEWAY_SECRET_ENV_VARS) if env.get(name)]
    found += [k.strip() for k in env.get(GATEWAY_KEYS_ENV, "").split(",") if k.strip()]
    return found


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret (in any case) and every credential-looking token replaced by [REDACTED]."""
    extra = [s for s in secrets if s and len(s) >= _MIN_SECRET_LEN]
    known = tuple(sorted(set(_secrets_by_length).union(extra), key=len, reverse=True)) if extra else _secrets_by_length
    if known:
        lowered = text.lower()
        if any(s in lowered for s in _lowered(known)):  # the regex only when a secret is there
            pattern = _secret_pattern(known)
            if pattern is not None:
                text = pattern.sub(REDACTED, text)
    if not _triggered(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_ESCAPE: Final = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\([\"\\/])")
_MAYBE_ESCAPED: Final = re.compile(r"\\[ux\"\\/]|%[0-9a-fA-F]{2}|&#?\w+;")
_UNESCAPE_ROUNDS: Final = 4  # `\\u0041` (escaped twice) and `%255C` take more than one


def _unescape_once(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = m.group(1) or m.group(2)
        return chr(int(code, 16)) if code else m.group(3)

    text = _ESCAPE.sub(one, text)
    if "%" in text:
        text = unquote(text, errors="replace")
    if "&" in text:
        text = html.unescape(text)
    return text


def unescape(text: str) -> str:
    """`text` as it reads once JSON (`\\u0041`), `\\x41`, percent (`%41`) and HTML
    (`&#65;`) escapes are undone, nested ones too, with compatibility forms
    folded (fullwidth letters) and invisible format characters (zero-width
    spaces) dropped: the spelling in which a disguised key shows."""
    if text.isascii() and "\\" not in text and "%" not in text and "&" not in text:
        return text  # no escape to undo, and ASCII has nothing to fold or drop
    return _unescape_all(text)


def _unescape_all(text: str) -> str:
    for _ in range(_UNESCAPE_ROUNDS):
        if not _MAYBE_ESCAPED.search(text):
            break
        text = _unescape_once(text)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # pair \ud83d\ude00; a lone half becomes U+FFFD
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`redact`, seeing through escapes: when the unescaped text holds a secret
    the redacted unescaped text is returned, otherwise `text` as `redact` leaves
    it (so ordinary `%20` or `\\n` in a log line stay as written)."""
    secrets = tuple(secrets)
    plain = unescape(text)
    if plain != text:
        cleaned = redact(plain, secrets)
        if cleaned != plain:
            return cleaned
    return redact(text, secrets)


@lru_cache(maxsize=64)
def _fragments(secrets: tuple[str, ...]) -> frozenset[str]:
    return frozenset(s[i : i + FRAGMENT_LEN] for s in secrets for i in range(len(s) - FRAGMENT_LEN + 1))


def mask_fragments(text: str, secrets: Iterable[str]) -> str:
    """`text` with every run of `FRAGMENT_LEN` or more characters that is part of
    a secret (in any letter case) replaced by [REDACTED]. Secrets shorter than
    that are left to `redact`'s whole-value match."""
    pieces = _fragments(tuple(sorted({s.lower() for s in secrets if s and len(s) >= FRAGMENT_LEN})))
    if not pieces or len(text) < FRAGMENT_LEN:
        return text
    low = text.lower()
    if len(low) != len(text):  # a few characters lower-case to two; keep positions aligned
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    spans: list[list[int]] = []
    for i in range(len(low) - FRAGMENT_LEN + 1):
        if low[i : i + FRAGMENT_LEN] in pieces:
            if spans and i <= spans[-1][1]:
                spans[-1][1] = i + FRAGMENT_LEN
            else:
                spans.append([i, i + FRAGMENT_LEN])
    if not spans:
        return text
    out, at = [], 0
    for start, end in spans:
        out += [text[at:start], REDACTED]
        at = end
    out.append(text[at:])
    return "".join(out)


def looks_like_secret(value: str) -> bool:
    """True if `value` is, or contains, something `redact` would scrub."""
    return redact(value) != value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if str(k).lower() in _NEVER_LOGGED_FIELDS else _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


_STANDARD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class RedactingFilter(logging.Filter):
    """Scrubs a record before any handler formats it: message and arguments
    (rendered first), extra fields, traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string, or an argument whose str() raises, must not drop the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, value in list(record.__dict__.items()):
            if name in _STANDARD_ATTRS:
                continue
            record.__dict__[name] = REDACTED if name.lower() in _NEVER_LOGGED_FIELDS else _scrub(value)
        return True


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then extra fields.
    The finished line is scrubbed again, so nothing reaches the stream
    unredacted even without `RedactingFilter`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD_ATTRS or name in entry:
                continue
            entry[name] = REDACTED if name.lower() in _NEVER_LOGGED_FIELDS else value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        line = json.dumps(entry, default=_json_default, ensure_ascii=False, separators=(",", ":"))
        return redact(line)


_HANDLER_MARK: Final = "_klein_json_handler"


def configure_logging(
    *,
    level: int | str = "INFO",
    stream: TextIO | None = None,
    secrets: Iterable[str] | None = None,
) -> logging.Handler:
    """Route every log record to one JSON-lines handler on the root logger.

    `secrets`: exact values to scrub; None reads them from the environment
    (`secrets_from_env`). Calling again replaces the handler, not adds one."""
    register_secrets(secrets_from_env() if secrets is None else secrets)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class RequestLogger:
    """Writes the one log line of each request (logger `klein.request`).

    `log_prompt_length`: opt in to a `prompt_chars` field; None reads
    `KLEIN_LOG_PROMPT_LENGTH` (1/true/yes). The prompt text is never written
    either way."""

    def __init__(self, logger: logging.Logger | None = None, *, log_prompt_length: bool | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger("klein.request")
        if log_prompt_length is None:
            log_prompt_length = os.environ.get(PROMPT_LENGTH_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self.log_prompt_length = log_prompt_length

    def fields(
        self,
        *,
        request_id: str,
        route: str,
        status: int,
        backend: str | None,
        attempts: int,
        cost_usd: Decimal,
        latency_s: float,
        overhead_s: float,
        caller: str | None = None,
        error_code: str | None = None,
        prompt: str | None = None,
    ) -> dict[str, Any]:
        """The fields of one request line. `caller` is the caller's label
        (`gateway.callers`), never a key; `prompt` is only measured, and only
        with `log_prompt_length`."""
        entry: dict[str, Any] = {
            "request_id": request_id,
            "route": route,
            "status": status,
            "backend": backend,
            "attempts": attempts,
            "cost_usd": str(cost_usd),
            "latency_s": round(latency_s, 6),
            "overhead_s": round(overhead_s, 6),
        }
        if caller is not None:
            entry["caller"] = caller
        if error_code is not None:
            entry["error_code"] = error_code
        if self.log_prompt_length and prompt is not None:
            entry["prompt_chars"] = len(prompt)
        return entry

    def log(self, **fields: Any) -> None:
        """Write the request's one line (the arguments of `fields`): level
        warning for 5xx, info otherwise."""
        entry = self.fields(**fields)
        self.logger.log(logging.WARNING if entry["status"] >= 500 else logging.INFO, "request", extra=entry)
