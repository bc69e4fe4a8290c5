"""The batch: what is stored, what the caller sees (OpenAI's batch object), how it moves.

A `BatchRecord` is small and changes often (status, counts, spend, the
forecast); the lines, priced once when the batch is validated, are a separate
record written once (`BatchLine`). Each line runs as an async image job whose
id follows from the batch's id and the line's `custom_id` (`line_job_id`), so
whoever drives the batch, after any crash, finds the line's job instead of
making a second one: a line is run, and paid, once.

Status moves as OpenAI's does: validating -> in_progress -> finalizing ->
completed; failed (the input could not be used at all); cancelling ->
cancelled; expired (the window ended before every line ran; the lines that
never started are in the error file as `batch_expired`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal

from gateway.domain.errors import InvalidRequest
from gateway.domain.models import MODEL_ID
from gateway.jobs.model import ID_PREFIX as JOB_PREFIX
from gateway.routing.pricing import usd_text

Status = Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
ID_PREFIX = "batch_"
_ID = re.compile(r"^batch_[0-9a-f]{24}$")
# What `completion_window` may be: OpenAI's `24h`, or any whole number of minutes or hours from 5m to 24h.
_WINDOW = re.compile(r"^([1-9][0-9]{0,4})(m|h)$")
MIN_WINDOW_S, MAX_WINDOW_S = 300, 86_400


def new_batch_id(now: float | None = None) -> str:
    """`batch_` + 12 hex digits of milliseconds + 12 random ones: ids sort by creation, so a listing is a range."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ID_PREFIX}{ms:012x}{secrets.token_hex(6)}"


def valid_batch_id(batch_id: str) -> bool:
    return bool(_ID.match(batch_id))


def window_seconds(window: object) -> int:
    """The completion window in seconds, or the caller's 400."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 3600) if match else 0
    if not MIN_WINDOW_S <= seconds <= MAX_WINDOW_S:
        raise InvalidRequest("completion_window must be 24h, or a whole number of minutes or hours from 5m to 24h (1h, 6h, 90m)", param="completion_window", code="invalid_value")
    return seconds


def line_job_id(batch_id: str, custom_id: str) -> str:
    """The job that runs one line: the batch's time part (so it sorts with the batch) and a digest of the line's identity."""
    digest = hashlib.sha256(f"{batch_id}\x00{custom_id}".encode()).hexdigest()[:16]
    return f"{JOB_PREFIX}{batch_id[len(ID_PREFIX) : len(ID_PREFIX) + 12]}{digest}"


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One input line as validated and priced; `error` when it could not be used (it fails alone)."""

    index: int  # 0-based among the file's request lines
    number: int  # the line's number in the file (1-based, blank lines counted), as error messages say it
    custom_id: str
    work_mp: float = 0.0  # output megapixels x n x steps/4: what the local GPU's rate is measured in
    local_usd: Decimal | None = None
    hosted_usd: Decimal | None = None
    hosted_backend: str | None = None
    error: dict[str, Any] | None = None  # the OpenAI error object of a line refused before it ran
    status_code: int | None = None  # that refusal's HTTP status

    def to_json(self) -> list[Any]:
        money = [str(v) if v is not None else None for v in (self.local_usd, self.hosted_usd)]
        return [self.index, self.number, self.custom_id, self.work_mp, *money, self.hosted_backend, self.error, self.status_code]

    @classmethod
    def from_json(cls, row: list[Any]) -> BatchLine:
        index, number, custom_id, work_mp, local, hosted, backend, error, status_code = row
        return cls(index, number, custom_id, work_mp, Decimal(local) if local is not None else None, Decimal(hosted) if hosted is not None else None, backend, error, status_code)

    def public_quote(self) -> dict[str, Any]:
        return {
            "custom_id": self.custom_id,
            "local_usd": usd_text(self.local_usd) if self.local_usd is not None else None,
            "hosted_usd": usd_text(self.hosted_usd) if self.hosted_usd is not None else None,
            "hosted_backend": self.hosted_backend,
            "error": self.error,
        }


@dataclass(slots=True)
class BatchRecord:
    id: str
    owner: str | None
    endpoint: str
    input_file_id: str
    completion_window: str
    window_s: int
    created_at: int
    base_url: str
    status: Status = "validating"
    metadata: dict[str, str] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None  # why the whole batch failed (OpenAI's `errors.data`)
    total: int = 0
    completed: int = 0
    failed: int = 0
    local: int = 0  # lines served by the local GPU so far
    hosted: int = 0  # lines served by hosted backends so far (spilled)
    spent_usd: Decimal = Decimal(0)
    quote: dict[str, Any] | None = None  # {"total_usd", "all_hosted_usd", "all_local_usd", "lines": [BatchLine.public_quote()]}
    forecast: dict[str, Any] | None = None  # {"finish_at", "cost_usd"}: the scheduler's latest view
    version: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def expires_at(self) -> int:
        return self.created_at + self.window_s

    def public(self) -> dict[str, Any]:
        """OpenAI's batch object, field for field, with the gateway's figures under `klein`."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": MODEL_ID,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
            "usage": None,  # OpenAI's token usage: images have none; the cost is under klein
            "klein": {
                "spent_usd": usd_text(self.spent_usd),
                "lines_local": self.local,
                "lines_hosted": self.hosted,
                "quote": self.quote,
                "forecast": self.forecast,
            },
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spent_usd"] = str(self.spent_usd)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchRecord:
        known = {k: v for k, v in data.items() if k in cls.__slots__}  # a newer replica's fields are left out (rolling upgrades)
        known["spent_usd"] = Decimal(known.get("spent_usd") or 0)
        return cls(**known)
