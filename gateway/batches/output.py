"""The output and error files' lines, as OpenAI's Batch API writes them. Pure.

Each line is `{"id", "custom_id", "response": {"status_code", "request_id",
"body", "headers"}, "error"}`. `body` is what the synchronous call would have
answered (the images object, or `{"error": ...}`), `headers` the `x-klein-*`
figures its answer would have carried. A line that got an answer goes to the
output file when it succeeded and to the error file when it did not; a line
that never ran (cancelled or expired before it started) goes to the error
file with `response: null` and `error` saying why, as OpenAI's do.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

from gateway.batches.model import BatchLine
from gateway.jobs.model import JobRecord
from gateway.routing.pricing import usd_text

NOT_RUN = {
    "batch_cancelled": "the batch was cancelled before this request started",
    "batch_expired": "this request could not be run before the batch's completion window ended",
}


def request_line_id(batch_id: str, custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}\x00{custom_id}\x00out".encode()).hexdigest()[:24]


def _headers(record: JobRecord) -> dict[str, str]:
    headers = {"x-request-id": record.id, "x-klein-cost-usd": usd_text(record.cost_usd or Decimal(0)), "x-klein-attempts": str(record.attempts)}
    if record.backend is not None:
        headers["x-klein-backend"] = record.backend
    return headers


def answered(batch_id: str, line: BatchLine, record: JobRecord) -> tuple[bool, dict[str, Any]]:
    """(whether it succeeded, its line) for a line whose job ended."""
    if record.result is not None:  # succeeded, or cancelled after its image was made and paid for
        body: dict[str, Any] = record.result
        status = 200
    elif record.status == "canceled" and record.error is None:
        return False, not_run(batch_id, line, "batch_cancelled", cost=record.cost_usd)
    else:
        body = {"error": record.error}
        status = record.status_code or 500
    response = {"status_code": status, "request_id": record.id, "body": body, "headers": _headers(record)}
    return status == 200, {"id": request_line_id(batch_id, line.custom_id), "custom_id": line.custom_id, "response": response, "error": None}


def refused(batch_id: str, line: BatchLine) -> dict[str, Any]:
    """A line refused before it ran (bad body, unknown model...): the 4xx the synchronous call would have answered."""
    response = {"status_code": line.status_code or 400, "request_id": None, "body": {"error": line.error}, "headers": {"x-klein-cost-usd": "0"}}
    return {"id": request_line_id(batch_id, line.custom_id), "custom_id": line.custom_id, "response": response, "error": None}


def not_run(batch_id: str, line: BatchLine, code: str, *, cost: Decimal | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": NOT_RUN[code]}
    if cost:
        error["cost_usd"] = usd_text(cost)
    return {"id": request_line_id(batch_id, line.custom_id), "custom_id": line.custom_id, "response": None, "error": error}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
