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
characters, never its text. That line skips the stdlib record: it is built
once from the gateway's own fields, encoded with msgspec in the same shape as
`JsonFormatter`'s, and written by the handler's writer thread
(`gateway.observability.linewriter`), so a slow stream never stalls the loop.
Only the fields a caller can shape (the request id, from `x-request-id`; the
caller's label; an error code) are scrubbed; the rest are numbers, the route
and the configured backend's name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, TextIO

import msgspec

from gateway.observability.linewriter import LineWriter
from gateway.providers import credential_env_names
from gateway.redaction import NEVER_LOGGED_FIELDS, REDACTED, redact, register_secrets, scrub
from gateway.settings import Settings, variables

# The gateway's own secrets: the /metrics token, the caller-label and image-URL signing keys.
GATEWAY_SECRET_ENV_VARS: Final = ("KLEIN_METRICS_TOKEN", "KLEIN_METRICS_KEY_SECRET", "KLEIN_URL_SIGNING_KEY")
PROMPT_LENGTH_ENV: Final = "KLEIN_LOG_PROMPT_LENGTH"  # opt-in: log prompt length (never text)


def secrets_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The configured secret values: every registered provider's credential
    variable (`Adapter.credential_env`), the caller keys and the gateway's own secrets."""
    env = os.environ if environ is None else environ
    settings, fields = Settings.from_env(env), variables()
    found = [env[name] for name in credential_env_names() if env.get(name)]  # declared by the adapters, not by Settings
    found += [value for value in (getattr(settings, fields[name]) for name in GATEWAY_SECRET_ENV_VARS) if value]
    found += [k.strip() for k in (settings.gateway_keys or "").split(",") if k.strip()]
    return found


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if str(k).lower() in NEVER_LOGGED_FIELDS else _scrub(v) for k, v in value.items()}
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
            record.__dict__[name] = REDACTED if name.lower() in NEVER_LOGGED_FIELDS else _scrub(value)
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
            entry[name] = REDACTED if name.lower() in NEVER_LOGGED_FIELDS else value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        line = json.dumps(entry, default=_json_default, ensure_ascii=False, separators=(",", ":"))
        return redact(line)


_HANDLER_MARK: Final = "_klein_json_handler"


class JsonLinesHandler(logging.StreamHandler):
    """The stdlib handler for ordinary records, plus `lines`: the writer
    thread that request lines go through, sharing the stream and its lock."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        assert self.lock is not None  # createLock() ran in Handler.__init__
        self.lines = LineWriter(stream, self.lock)

    def flush(self) -> None:
        """Write the queued request lines, then flush the stream."""
        self.lines.flush()
        super().flush()

    def close(self) -> None:
        self.lines.shutdown()
        super().close()


def json_handler(stream: TextIO) -> JsonLinesHandler:
    """The JSON-lines handler on `stream`: redacting filter, JSON formatter, request-line writer."""
    handler = JsonLinesHandler(stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter())
    return handler


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
        if isinstance(old, JsonLinesHandler):
            old.lines.close()  # its queued lines still reach its stream
    handler = json_handler(stream if stream is not None else sys.stderr)
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
            log_prompt_length = Settings.from_env().log_prompt_length
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
        (`gateway.domain.callers`), never a key; `prompt` is only measured, and only
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
        warning for 5xx, info otherwise.

        Where `configure_logging`'s handler is the only one that would see the
        record, the line goes straight to its writer thread; any other set-up
        (a test's capture handler, a filter, an extra handler) gets the stdlib
        record as before."""
        entry = self.fields(**fields)
        level = logging.WARNING if entry["status"] >= 500 else logging.INFO
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        handler = _sole_json_handler(logger, level)
        if handler is None:
            logger.log(level, "request", extra=entry)
            return
        handler.lines.submit(request_line(logger.name, level, entry))

    def close(self) -> None:
        """Write every queued request line and join the writer thread (the app's shutdown)."""
        handler = _sole_json_handler(self.logger, logging.INFO)
        if handler is not None:
            handler.lines.close()


# Fields a caller can shape: `x-request-id` (any sane token), the caller's
# label (a key's configured name) and an error code. Everything else in a
# request line is a number, the route or a configured backend's name.
CALLER_SHAPED_FIELDS: Final = ("request_id", "caller", "error_code")
_FLOAT_FIELDS: Final = ("latency_s", "overhead_s")
_LEVEL_NAMES: Final = {logging.INFO: "info", logging.WARNING: "warning"}
_encode = msgspec.json.Encoder().encode
_second: tuple[int, str] = (-1, "")  # the last whole second and its ISO text, swapped as one


def log_timestamp(now: float) -> str:
    """`JsonFormatter`'s `ts` (ISO 8601, milliseconds, Z), its second's text worked out once per second."""
    micros = round(now * 1_000_000)  # as datetime.fromtimestamp rounds
    second, fraction = divmod(micros, 1_000_000)
    global _second
    known, text = _second
    if second != known:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (second, text)
    return f"{text}.{fraction // 1000:03d}Z"


def request_line(logger_name: str, level: int, fields: Mapping[str, Any], now: float | None = None) -> str:
    """The JSON line `JsonFormatter` would write for these fields (and its newline).

    Each caller-shaped field is scrubbed on its own (`scrub`, so escaped spellings
    count too). The finished line needs no second pass: every key is a fixed
    name none of the redaction patterns can start on, so no pattern can match
    across fields, and the other values are the gateway's own."""
    entry: dict[str, Any] = {
        "ts": log_timestamp(time.time() if now is None else now),
        "level": _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower(),
        "logger": logger_name,
        "msg": "request",
    }
    entry.update(fields)
    for name in CALLER_SHAPED_FIELDS:
        value = entry.get(name)
        if isinstance(value, str):
            entry[name] = scrub(value)
    for name in _FLOAT_FIELDS:
        value = entry.get(name)
        if isinstance(value, float) and math.isfinite(value):
            entry[name] = msgspec.Raw(repr(value).encode())  # json.dumps' spelling (1e-06, not 1e-6)
    return _encode(entry).decode() + "\n"


def _only_redacting(handler: logging.Handler) -> bool:
    return len(handler.filters) == 1 and isinstance(handler.filters[0], RedactingFilter)


def _sole_json_handler(logger: logging.Logger, level: int) -> JsonLinesHandler | None:
    """The JSON handler, when it is the only handler a record of `logger` at
    `level` reaches and no logger on the way filters; else None."""
    found: JsonLinesHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for h in current.handlers:
            if found is not None or not isinstance(h, JsonLinesHandler) or h.level > level or not _only_redacting(h):
                return None
            found = h
        if not current.propagate:
            break
        current = current.parent
    return found
