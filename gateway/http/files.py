"""OpenAI's Files API: upload, read, download, list and delete files.

`POST /v1/files` (multipart: `file`, `purpose`, optional `expires_after[anchor]`
and `expires_after[seconds]`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`DELETE /v1/files/{id}`, `GET /v1/files` (`purpose`, `limit`, `after`, `order`).
A file is its uploader's: to any other key it does not exist (404, as a
missing one), so ids cannot be probed. The upload's size is bounded by
`gateway.max_file_bytes` (413), counted as it arrives rather than after, so a
huge body is never held; the app's own body limit does not apply here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Request, Response, delete, get, post
from litestar.datastructures import UploadFile

from gateway.domain.errors import InvalidRequest, NotFound, PayloadTooLarge
from gateway.files import PURPOSES, FileRecord, check_batch_lines
from gateway.http.context import CallContext, form_of
from gateway.http.entry import begin, gateway_of

if TYPE_CHECKING:
    from gateway.files import Files
    from gateway.service import Gateway

MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and the small fields around the file
MAX_LIST = 10_000  # OpenAI's largest page, and its default
MIN_EXPIRY_S = 3600  # OpenAI's bounds on expires_after.seconds
_DIGITS = re.compile(r"^[0-9]{1,12}$")  # ASCII digits only: str.isdigit takes "²", which int() refuses


def _begin(request: Request[Any, Any, Any]) -> tuple[Gateway, Files, CallContext]:
    gw = gateway_of(request)
    return gw, gw.files, begin(request, gw)


def _json(body: dict[str, Any], status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=status, media_type=MediaType.JSON)


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"no file {file_id!r}", param="file_id", code="file_not_found")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the file is over the gateway's limit of {limit:,} bytes (gateway.max_file_bytes)", param="file", code="file_too_large")


async def _read_bounded(request: Request[Any, Any, Any], limit: int) -> None:
    """Read the body, refusing it (413) as soon as it is longer than a file of `limit` bytes can make it;
    the body is kept on the request, where the form parser reads it."""
    bound = limit + MULTIPART_SLACK
    announced = request.headers.get("content-length")
    if announced is not None and _DIGITS.match(announced) and int(announced) > bound:
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > bound:
            raise _too_large(limit)
        chunks.append(chunk)
    request._body = request._connection_state.body = b"".join(chunks)  # what request.form() will parse


def _expires_after(form: Any, retention_s: int) -> int | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be created_at", param="expires_after.anchor", code="invalid_value")
    if not isinstance(seconds, str) or not _DIGITS.match(seconds.strip()) or not MIN_EXPIRY_S <= int(seconds) <= retention_s:
        raise InvalidRequest(f"expires_after[seconds] must be a whole number from {MIN_EXPIRY_S} to {retention_s}", param="expires_after.seconds", code="invalid_value")
    return int(seconds)


@post("/v1/files", status_code=200, request_max_body_size=None)
async def create_file(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw, files, ctx = _begin(request)
    settings = gw.config.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise InvalidRequest("upload a file as multipart/form-data with the fields file and purpose", code="invalid_content_type")
    await _read_bounded(request, settings.max_file_bytes)
    form = await form_of(request)
    purpose = form.get("purpose")
    if purpose is None:
        raise InvalidRequest("purpose is required: batch, vision or user_data", param="purpose", code="missing_required_parameter")
    if not isinstance(purpose, str):
        raise InvalidRequest("purpose must be a text field: batch, vision or user_data", param="purpose", code="unsupported_purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose {purpose!r} is not supported here; use one of {', '.join(PURPOSES)}", param="purpose", code="unsupported_purpose")
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("file is required: the file's bytes as a multipart file part", param="file", code="missing_required_parameter")
    data = await upload.read()
    if len(data) > settings.max_file_bytes:
        raise _too_large(settings.max_file_bytes)
    if not data:
        raise InvalidRequest("the file is empty", param="file", code="empty_file")
    expires_after_s = _expires_after(form, settings.file_retention_s)
    if purpose == "batch":
        check_batch_lines(data)
    record = await files.create(ctx.caller, filename=upload.filename, purpose=purpose, data=data, expires_after_s=expires_after_s)
    return _json(record.public())


async def _owned(files: Files, ctx: CallContext, file_id: str) -> FileRecord:
    record = await files.get(ctx.caller, file_id)
    if record is None:
        raise _not_found(file_id)
    return record


@get("/v1/files/{file_id:str}")
async def retrieve_file(request: Request[Any, Any, Any], file_id: str) -> Response[bytes]:
    _, files, ctx = _begin(request)
    return _json((await _owned(files, ctx, file_id)).public())


@get("/v1/files/{file_id:str}/content")
async def file_content(request: Request[Any, Any, Any], file_id: str) -> Response[bytes]:
    _, files, ctx = _begin(request)
    found = await files.content(ctx.caller, file_id)
    if found is None:
        raise _not_found(file_id)
    _, data = found
    return Response(data, media_type="application/octet-stream")


@delete("/v1/files/{file_id:str}", status_code=200)
async def delete_file(request: Request[Any, Any, Any], file_id: str) -> Response[bytes]:
    _, files, ctx = _begin(request)
    if not await files.delete(ctx.caller, file_id):
        raise _not_found(file_id)
    return _json({"id": file_id, "object": "file", "deleted": True})


@get("/v1/files")
async def list_files(request: Request[Any, Any, Any]) -> Response[bytes]:
    _, files, ctx = _begin(request)
    params = request.query_params
    purpose = params.get("purpose") or None
    order = params.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order", code="invalid_value")
    raw_limit = params.get("limit") or str(MAX_LIST)
    if not _DIGITS.match(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIST:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIST:,}", param="limit", code="invalid_value")
    records, more = await files.list(ctx.caller, purpose=purpose, limit=int(raw_limit), after=params.get("after") or None, order=order)  # type: ignore[arg-type]
    data = [r.public() for r in records]
    return _json({"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": more})


ROUTES = [create_file, list_files, retrieve_file, file_content, delete_file]
