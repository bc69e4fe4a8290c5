"""A `purpose=batch` file checked before it is stored: JSONL, one request a line.

Each line is `{"custom_id": "...", "method": "POST", "url": "/v1/images/generations"
| "/v1/images/edits", "body": {...}}`, as OpenAI's Batch API takes them. The
first line that is not is refused by number (1-based) and reason, so a caller
fixes the file before any batch is made of it. Blank lines are skipped (a file
ending in a newline is the norm), and so is a UTF-8 byte order mark. The body
is only checked to be an object here: what it asks for is checked as any
request is, when the batch runs it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.domain.errors import InvalidRequest

BATCH_URLS = ("/v1/images/generations", "/v1/images/edits")
MAX_BATCH_LINES = 50_000  # OpenAI's cap on the requests of one batch
MAX_CUSTOM_ID_CHARS = 512


def _refuse(line: int, why: str) -> InvalidRequest:
    return InvalidRequest(f"line {line}: {why}", param="file", code="invalid_batch_file", details={"line": line})


def check_batch_lines(data: bytes) -> int:
    """The number of requests in a valid batch file; else InvalidRequest naming the first bad line."""
    seen: dict[str, int] = {}
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark, as some editors write
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(seen) >= MAX_BATCH_LINES:
            raise _refuse(number, f"a batch file holds at most {MAX_BATCH_LINES:,} requests")
        try:
            line: Any = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            raise _refuse(number, "not valid JSON (each line must be one JSON object, UTF-8)") from None
        if not isinstance(line, dict):
            raise _refuse(number, "must be a JSON object with custom_id, method, url and body")
        custom_id = line.get("custom_id")
        if custom_id is None:
            raise _refuse(number, "custom_id is missing")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
            raise _refuse(number, f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters")
        if custom_id in seen:
            raise _refuse(number, f"custom_id {custom_id!r} is also on line {seen[custom_id]}; each must be unique")
        if line.get("method") != "POST":
            raise _refuse(number, "method must be POST")
        url = line.get("url")
        if url not in BATCH_URLS:
            shown = repr(url) if isinstance(url, str) else "missing"
            raise _refuse(number, f"url {shown} is not supported; use one of {', '.join(BATCH_URLS)}")
        if not isinstance(line.get("body"), dict):
            raise _refuse(number, "body must be a JSON object (the request's parameters)")
        seen[custom_id] = number
    if not seen:
        raise InvalidRequest("the batch file holds no request lines", param="file", code="invalid_batch_file")
    return len(seen)
