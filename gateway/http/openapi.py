"""The OpenAPI 3.1 document of the gateway, served at GET /openapi.json.

Handlers answer raw Responses (for speed and for exact OpenAI shapes), so
litestar cannot infer the document; it is written here instead. The request
bodies come from the pydantic models that validate them (gateway.http.parse),
so the document and the validation cannot drift. Everything else is kept
true by tests: every route the app serves appears here with the statuses it
really answers, every hostile input's status is declared, and schemathesis
checks live answers against it.

Litestar answers OPTIONS on every path by itself (the methods allowed, in
`Allow`); that is not listed per operation.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from litestar import MediaType, Response, get

from gateway.dispatch.references import MAX_REFERENCE_BYTES
from gateway.domain.models import MAX_MODEL_CHARS, MODEL_ID
from gateway.files import BATCH_URLS
from gateway.files import PURPOSES as FILE_PURPOSES
from gateway.http.context import MAX_DEADLINE_DIGITS
from gateway.http.parse import ImageBody

VERSION = "0.1.0"

_REF = "#/components/schemas/{model}"


def _schema(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page_of(item: str) -> dict[str, Any]:
    """OpenAI's cursor-paginated list of `item` objects (jobs, files, batches)."""
    return {
        "type": "object",
        "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _schema(item)},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
    }


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


HEADERS: dict[str, Any] = {
    "RequestId": {
        "description": "The request's id: the caller's own `x-request-id` when it is 1-128 of `A-Za-z0-9._:-`, else a new one. Logged with the request.",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    },
    "ShouldRetry": {"description": "Whether retrying the same request can help (as OpenAI's SDKs read it).", "schema": {"type": "string", "enum": ["true", "false"]}},
    "RetryAfter": {"description": "Seconds to wait before retrying.", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "Backend": {"description": "The backend that made the images.", "required": True, "schema": {"type": "string"}},
    "CostUsd": {"description": "What the request cost, in US dollars, as a decimal string; the same figure the spend metrics record.", "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}},
    "Attempts": {"description": "How many backends were tried.", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "Nsfw": {"description": "Indexes of images the safety checker flagged, comma-separated.", "schema": {"type": "string"}},
    "BilledUsd": {
        "description": "What the serving provider itself reported billing, where its answer carries a figure (reconciliation).",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "PossiblyBilledUsd": {
        "description": "Work whose outcome is unknown and whose cancel was not confirmed: it may be billed; not in x-klein-cost-usd.",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "RateLimit": {"description": "OpenAI's rate-limit headers for keys with a limit (x-ratelimit-{limit,remaining,reset}-{requests,images}).", "schema": {"type": "string"}},
    "OriginalCostUsd": {
        "description": "On a replay (x-klein-cost-usd is then 0: nothing was spent now), what the original request cost.",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "OriginalPossiblyBilledUsd": {
        "description": "On a replay, the original request's x-klein-possibly-billed-usd.",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "IdempotentReplayed": {"description": "`true` when the answer is the stored one of an earlier request with the same Idempotency-Key.", "schema": {"const": "true"}},
    "Location": {"description": "Where the job can be read.", "required": True, "schema": {"type": "string"}},
    "PreferenceApplied": {"description": "`respond-async` (RFC 7240).", "required": True, "schema": {"const": "respond-async"}},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "OpenAI's error envelope. Failures after trying backends add `attempts`.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string", "description": "What was wrong, for the caller; never a credential."},
                    "type": {"type": "string", "enum": ["invalid_request_error", "authentication_error", "rate_limit_error", "server_error"]},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                    "attempts": {"type": "array", "items": {"type": "object"}},
                },
            }
        },
    },
    "Image": {
        "type": "object",
        "description": "One image: a URL (the provider's, or a signed URL the gateway serves) or base64 bytes.",
        "oneOf": [
            {"required": ["url"], "properties": {"url": {"type": "string"}, "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}}},
            {"required": ["b64_json"], "properties": {"b64_json": {"type": "string"}, "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}}},
        ],
    },
    "ImagesResponse": {
        "type": "object",
        "required": ["created", "data", "output_format", "size"],
        "properties": {
            "created": {"type": "integer"},
            "data": {"type": "array", "minItems": 1, "items": _schema("Image")},
            "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
            "size": {
                "type": "string",
                "pattern": "^[0-9]+x[0-9]+$",
                "description": "What was produced: the requested size, or for a request that gave only a shape (aspect_ratio, a preset, auto) the serving backend's native size near it.",
            },
        },
    },
    "QuoteRequest": {
        "allOf": [
            _schema("ImageBody"),
            {"type": "object", "properties": {"edit_images": {"type": "integer", "description": "Quote an edit with this many references (clamped to 0-8) without uploading them."}}},
        ]
    },
    "QuoteRow": {
        "type": "object",
        "required": ["name", "eligible", "reason", "cost_usd", "basis", "breakdown", "state"],
        "properties": {
            "name": {"type": "string"},
            "eligible": {"type": "boolean"},
            "size": {"type": "string", "description": "The size this backend would produce (and is priced at)."},
            "reason": {"type": "string"},
            "cost_usd": {"type": ["string", "null"]},
            "basis": {"type": ["string", "null"]},
            "breakdown": {"type": ["string", "null"]},
            "state": {"type": "string"},
        },
    },
    "Quote": {
        "type": "object",
        "required": ["object", "model", "size", "n", "kind", "chosen", "cost_usd", "order", "backends"],
        "properties": {
            "object": {"const": "quote"},
            "model": {"const": MODEL_ID},
            "size": {"type": "string"},
            "n": {"type": "integer"},
            "kind": {"type": "string", "enum": ["generate", "edit"]},
            "chosen": {"type": ["string", "null"]},
            "chosen_size": {"type": ["string", "null"], "description": "The size the chosen backend would produce: `size`, or its native size near it for a request that gave only a shape."},
            "cost_usd": {"type": ["string", "null"]},
            "order": {"type": "array", "items": {"type": "string"}},
            "backends": {"type": "array", "items": _schema("QuoteRow")},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"}},
    },
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _schema("Model")}}},
    "Backend": {
        "type": "object",
        "description": "One configured backend; enabled ones add their health (state, error rate, cool-down).",
        "required": ["name", "enabled"],
        "properties": {"name": {"type": "string"}, "enabled": {"type": "boolean"}, "kind": {"type": "string"}, "reason": {"type": "string"}, "state": {"type": "string"}},
    },
    "BackendList": {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _schema("Backend")}}},
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Readiness": {
        "type": "object",
        "required": ["status", "state_store", "backends"],
        "properties": {"status": {"type": "string", "enum": ["ready", "not_ready"]}, "state_store": {"type": "string"}, "backends": {"type": "integer"}},
    },
    "ImageJob": {
        "type": "object",
        "description": "An async image job (Prefer: respond-async); `result` is exactly the synchronous answer's body.",
        "required": ["id", "object", "status", "created", "completed", "backend", "cost_usd", "attempts", "result", "error", "metadata", "webhook"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "image.job"},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
            "created": {"type": "integer"},
            "completed": {"type": ["integer", "null"]},
            "backend": {"type": ["string", "null"]},
            "cost_usd": {"type": ["string", "null"]},
            "attempts": {"type": "integer"},
            "result": {"oneOf": [_schema("ImagesResponse"), {"type": "null"}]},
            "error": {"type": ["object", "null"]},
            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
            "webhook": {"type": ["object", "null"]},
        },
    },
    "ImageJobList": _page_of("ImageJob"),
    "Usage": {
        "type": "object",
        "description": "Spend, billed figure, images, megapixels and requests from the usage ledger, grouped as asked, with a total.",
        "required": ["data", "total"],
        "properties": {"data": {"type": "array", "items": {"type": "object"}}, "total": {"type": "object"}},
    },
    "EditForm": {
        "type": "object",
        "description": "OpenAI's multipart edit form: 1 to 4 images as `image`, `image[]` or `image[0..3]`; every other field as in ImageBody, as text (`provider` as JSON text).",
        "required": ["prompt", "image"],
        "properties": {
            "prompt": {"type": "string"},
            "image": {"type": "string", "format": "binary", "description": f"PNG, JPEG or WebP; at most {MAX_REFERENCE_BYTES:,} bytes and 4096x4096 pixels."},
            "model": {"type": "string", "maxLength": MAX_MODEL_CHARS},
            "n": {"type": "string"},
            "size": {"type": "string"},
            "response_format": {"type": "string", "enum": ["url", "b64_json"]},
            "output_format": {"type": "string", "enum": ["png", "jpeg", "jpg", "webp"]},
            "seed": {"type": "string"},
            "stream": {"type": "string", "enum": ["true", "false"]},
            "partial_images": {"type": "string"},
            "provider": {"type": "string", "description": "ProviderPrefsBody as JSON text."},
        },
    },
}

ERROR_DESCRIPTIONS = {
    400: "The request can never succeed as written (a field, a header, JSON, a disabled backend pinned).",
    401: "Missing or wrong `Authorization: Bearer <key>` (when the gateway has keys).",
    403: "The caller's key may not use the backend it pinned or named (its `backends` rule).",
    404: "Unknown model, job or file (another key's is unknown too), or an image URL that is wrong or expired.",
    409: "A request with the same Idempotency-Key is still running.",
    413: "The body, an uploaded file (gateway.max_file_bytes), a reference image or its pixel count is over the limit.",
    415: "The body or a reference image is of a type the gateway does not take.",
    422: "Well-formed, but no backend can do it, or a reference image cannot be decoded.",
    429: "A rate limit (`rate_limit_exceeded`, with Retry-After) or a budget (`insufficient_quota`) of the caller's key.",
    499: "The caller closed the connection; the backend job was cancelled where the provider allows it.",
    500: "A bug in the gateway; the request id is in `x-request-id`.",
    502: "Every eligible backend failed.",
    503: "No backend is available now, or the gateway is at capacity (with Retry-After).",
    504: "No backend answered within the deadline.",
}


def _error(status: int, *, cost_headers: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {"x-request-id": _header("RequestId"), "x-should-retry": _header("ShouldRetry"), "retry-after": _header("RetryAfter")}
    if cost_headers:
        headers |= {"x-klein-cost-usd": _header("CostUsd"), "x-klein-attempts": _header("Attempts")}
    return {"description": ERROR_DESCRIPTIONS[status], "headers": headers, "content": {"application/json": {"schema": _schema("Error")}}}


def _ok(description: str, schema: str | dict[str, Any], *, media: str = MediaType.JSON, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    content = {media: {"schema": _schema(schema) if isinstance(schema, str) else schema}}
    return {"description": description, "headers": {"x-request-id": _header("RequestId"), **(headers or {})}, "content": content}


def _errors(*statuses: int, cost_headers: bool = False) -> dict[str, Any]:
    return {str(s): _error(s, cost_headers=cost_headers) for s in statuses}


AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
DEADLINE = {
    "name": "x-klein-deadline-ms",
    "in": "header",
    "required": False,
    "description": "The request's time budget in milliseconds, at least 100 (at most the configured max_deadline_s); default default_deadline_s.",
    "schema": {"type": "string", "pattern": f"^[0-9]{{1,{MAX_DEADLINE_DIGITS}}}$"},
}
PREFER = {"name": "Prefer", "in": "header", "required": False, "description": "`respond-async` (RFC 7240): answer 202 with a job instead of waiting.", "schema": {"type": "string"}}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Replays the stored answer of an earlier request with this key and body (kept 24 h, per caller); at most 255 characters.",
    "schema": {"type": "string"},
}  # fmt: skip
IMAGE_STATUSES = (400, 401, 403, 404, 409, 413, 415, 422, 429, 499, 500, 502, 503, 504)
RATE_LIMIT_HEADERS = {f"x-ratelimit-{part}-{what}": _header("RateLimit") for part in ("limit", "remaining", "reset") for what in ("requests", "images")}
IMAGE_HEADERS = {
    "x-klein-backend": _header("Backend"), "x-klein-cost-usd": _header("CostUsd"), "x-klein-attempts": _header("Attempts"), "x-klein-nsfw": _header("Nsfw"),
    "x-klein-billed-usd": _header("BilledUsd"), "x-klein-possibly-billed-usd": _header("PossiblyBilledUsd"), "idempotent-replayed": _header("IdempotentReplayed"),
    "x-klein-original-cost-usd": _header("OriginalCostUsd"), "x-klein-original-possibly-billed-usd": _header("OriginalPossiblyBilledUsd"),
    **RATE_LIMIT_HEADERS,
}  # fmt: skip
JOB_STATUSES = (400, 401, 404, 500, 503)


STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events, OpenAI's `image_generation.completed` (`image_edit.completed`) per image, "
    "with `image_index` and the request's `klein` figures (backend, cost_usd, attempts); SSE comment lines carry the "
    "provider's queue status; a failure after the stream began is an `error` event with the error envelope."
)


def _images_operation(summary: str, request_body: dict[str, Any], operation_id: str) -> dict[str, Any]:
    ok = _ok("The images, from the cheapest healthy backend that could make them.", "ImagesResponse", headers=IMAGE_HEADERS)
    ok["content"]["text/event-stream"] = {"schema": {"type": "string", "description": STREAM_DESCRIPTION}}
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": AUTH,
        "parameters": [DEADLINE, PREFER, IDEMPOTENCY_KEY],
        "requestBody": request_body,
        "responses": {
            "200": ok,
            "202": _ok("With `Prefer: respond-async`: the job, queued.", "ImageJob", headers={"location": _header("Location"), "preference-applied": _header("PreferenceApplied")}),
            **_errors(*IMAGE_STATUSES, cost_headers=True),
        },
    }


def _paths() -> dict[str, Any]:
    example = {"prompt": "a lighthouse at dusk, oil painting", "size": "1024x768", "n": 1, "response_format": "url"}
    json_body = {"required": True, "content": {"application/json": {"schema": _schema("ImageBody"), "example": example}}}
    edit_body = {"required": True, "content": {"multipart/form-data": {"schema": _schema("EditForm")}, "application/json": {"schema": _schema("ImageBody")}}}
    return {
        "/v1/images/generations": {"post": _images_operation("Generate images (OpenAI Images API).", json_body, "createImage")},
        "/v1/images/edits": {"post": _images_operation("Edit from 1 to 4 reference images (multipart as OpenAI, or JSON `images`).", edit_body, "createImageEdit")},
        "/v1/images/quote": {
            "post": {
                "operationId": "quoteImage",
                "summary": "Every backend's price and eligibility for a generation body; nothing is generated.",
                "security": AUTH,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _schema("QuoteRequest")}}},
                "responses": {"200": _ok("The quote.", "Quote"), **_errors(400, 401, 404, 413, 415, 422, 500)},
            }
        },
        "/v1/models": {
            "get": {"operationId": "listModels", "summary": "The model and its backend pins.", "security": AUTH, "responses": {"200": _ok("The models.", "ModelList"), **_errors(401, 500)}}
        },
        "/v1/models/{model_id}": {
            "get": {
                "operationId": "retrieveModel",
                "summary": "One model, by id, alias or `backend/model` pin.",
                "security": AUTH,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}, "examples": {"model": {"value": MODEL_ID}, "pinned": {"value": f"fal/{MODEL_ID}"}}}],
                "responses": {"200": _ok("The model.", "Model"), **_errors(401, 404, 500)},
            }
        },
        "/v1/images/files/{name}": {
            "get": {
                "operationId": "getImageFile",
                "summary": "An image the gateway serves itself; the signed, expiring URL is the credential.",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "expires", "in": "query", "required": False, "schema": {"type": "integer"}},
                    {"name": "sig", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "The image.",
                        "headers": {"x-request-id": _header("RequestId")},
                        "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in ("image/png", "image/jpeg", "image/webp")},
                    },
                    **_errors(400, 404),
                },
            }
        },
        "/v1/images/jobs": {
            "get": {
                "operationId": "listImageJobs",
                "summary": "The caller's async jobs, newest first, cursor-paginated.",
                "security": AUTH,
                "parameters": [
                    {"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": _ok("The jobs.", "ImageJobList"), **_errors(*JOB_STATUSES)},
            }
        },
        "/v1/images/jobs/{job_id}": {
            "get": {
                "operationId": "retrieveImageJob",
                "summary": "One async job, to the caller that made it (404 to any other).",
                "security": AUTH,
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _ok("The job.", "ImageJob"), **_errors(*JOB_STATUSES)},
            }
        },
        "/v1/images/jobs/{job_id}/events": {
            "get": {
                "operationId": "streamImageJobEvents",
                "summary": "Server-sent events: the job object (as retrieveImageJob answers it) at each change, `id:` its version, `event:` its status; ends after the terminal one.",
                "security": AUTH,
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}, "description": "Resume: only the changes after this event id."},
                ],
                "responses": {
                    "200": _ok("The event stream.", {"type": "string"}, media="text/event-stream"),
                    "204": {"description": "The job ended at or before Last-Event-ID: nothing more will come.", "headers": {"x-request-id": _header("RequestId")}},
                    **_errors(*JOB_STATUSES),
                },
            }
        },
        "/v1/images/jobs/{job_id}/cancel": {
            "post": {
                "operationId": "cancelImageJob",
                "summary": "Cancel an async job, and its provider job where the provider allows.",
                "security": AUTH,
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _ok("The job.", "ImageJob"), **_errors(*JOB_STATUSES)},
            }
        },
        "/v1/usage": {
            "get": {
                "operationId": "usage",
                "summary": "Spend from the usage ledger: a key sees its own, an admin key everyone's.",
                "security": AUTH,
                "parameters": [
                    {"name": "start", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "end", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "group_by", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": _ok("The usage.", "Usage"), **_errors(400, 401, 500)},
            }
        },
        "/v1/backends": {
            "get": {
                "operationId": "listBackends",
                "summary": "Every configured backend, its pricing and health.",
                "security": AUTH,
                "responses": {"200": _ok("The backends.", "BackendList"), **_errors(401, 500)},
            }
        },
        **_file_paths(),
        **_batch_paths(),
        "/metrics": {
            "get": {"operationId": "metrics", "summary": "Prometheus metrics.", "responses": {"200": _ok("Prometheus text exposition.", {"type": "string"}, media="text/plain"), **_errors(401, 404)}}
        },
        "/healthz": {"get": {"operationId": "liveness", "summary": "Liveness: the process answers.", "responses": {"200": _ok("Alive.", "Health")}}},
        "/readyz": {
            "get": {
                "operationId": "readiness",
                "summary": "Readiness: configuration loaded and backends enabled; degraded (still 200) while Redis is down.",
                "responses": {"200": _ok("Ready.", "Readiness"), "503": _ok("Not ready.", "Readiness")},
            }
        },
        "/openapi.json": {
            "get": {"operationId": "openapi", "summary": "This document.", "responses": {"200": _ok("The OpenAPI 3.1 document.", {"type": "object", "required": ["openapi", "info", "paths"]})}}
        },
    }


FILE_SCHEMAS: dict[str, Any] = {
    "FileObject": {
        "type": "object",
        "description": "OpenAI's file object.",
        "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^file-[0-9a-f]{24}$"},
            "object": {"const": "file"},
            "bytes": {"type": "integer", "minimum": 1},
            "created_at": {"type": "integer"},
            "filename": {"type": "string"},
            "purpose": {"type": "string", "enum": [*FILE_PURPOSES, "batch_output"]},
            "status": {"type": "string", "enum": ["uploaded", "processed", "error"]},
            "status_details": {"type": "null"},
            "expires_at": {"type": "integer"},
        },
    },
    "FileList": _page_of("FileObject"),
    "FileDeleted": {"type": "object", "required": ["id", "object", "deleted"], "properties": {"id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"const": True}}},
    "FileUpload": {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "The file's bytes; for `batch`, JSONL of {custom_id, method: POST, url: /v1/images/generations | /v1/images/edits, body}."},
            "purpose": {
                "type": "string",
                "enum": list(FILE_PURPOSES),
                "description": "`batch` is checked line by line (400 naming the first bad line); `vision` and `user_data` are kept as opaque bytes.",
            },
            "expires_after[anchor]": {"const": "created_at"},
            "expires_after[seconds]": {"type": "integer", "minimum": 3600, "description": "At most gateway.file_retention_s (default 30 days, the default lifetime)."},
        },
    },
}


def _file_paths() -> dict[str, Any]:
    """OpenAI's Files API (gateway/http/files.py): the input of image batches."""
    file_id = [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    statuses = (401, 404, 500, 503)
    return {
        "/v1/files": {
            "post": {
                "operationId": "createFile",
                "summary": "Upload a file (multipart, as OpenAI's SDKs send it); it belongs to the key that uploads it.",
                "security": AUTH,
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _schema("FileUpload")}}},
                "responses": {"200": _ok("The file.", "FileObject"), **_errors(400, 401, 413, 500, 503)},
            },
            "get": {
                "operationId": "listFiles",
                "summary": "The caller's files by created_at (desc by default), cursor-paginated by `after`.",
                "security": AUTH,
                "parameters": [
                    {"name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "order", "in": "query", "required": False, "schema": {"type": "string", "enum": ["asc", "desc"]}},
                ],
                "responses": {"200": _ok("The files.", "FileList"), **_errors(400, 401, 500, 503)},
            },
        },
        "/v1/files/{file_id}": {
            "get": {
                "operationId": "retrieveFile",
                "summary": "One file's object.",
                "security": AUTH,
                "parameters": file_id,
                "responses": {"200": _ok("The file.", "FileObject"), **_errors(*statuses)},
            },
            "delete": {
                "operationId": "deleteFile",
                "summary": "Delete a file and its bytes.",
                "security": AUTH,
                "parameters": file_id,
                "responses": {"200": _ok("Deleted.", "FileDeleted"), **_errors(*statuses)},
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "operationId": "downloadFile",
                "summary": "The file's bytes, as uploaded.",
                "security": AUTH,
                "parameters": file_id,
                "responses": {"200": _ok("The bytes.", {"type": "string", "format": "binary"}, media="application/octet-stream"), **_errors(*statuses)},
            }
        },
    }


_NULLABLE_INT = {"type": ["integer", "null"]}
BATCH_SCHEMAS: dict[str, Any] = {
    "Batch": {
        "type": "object",
        "description": "OpenAI's batch object, with the gateway's figures under `klein`.",
        "required": ["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at", "expires_at", "request_counts"],
        "properties": {
            "id": {"type": "string", "pattern": "^batch_[0-9a-f]{24}$"},
            "object": {"const": "batch"},
            "endpoint": {"type": "string", "enum": list(BATCH_URLS)},
            "model": {"type": "string"},
            "errors": {"type": ["object", "null"]},
            "input_file_id": {"type": "string"},
            "completion_window": {"type": "string"},
            "status": {"type": "string", "enum": ["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"]},
            "output_file_id": {"type": ["string", "null"]},
            "error_file_id": {"type": ["string", "null"]},
            "created_at": {"type": "integer"},
            "expires_at": {"type": "integer"},
            **{name: _NULLABLE_INT for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
            "request_counts": {
                "type": "object",
                "required": ["total", "completed", "failed"],
                "properties": {"total": {"type": "integer"}, "completed": {"type": "integer"}, "failed": {"type": "integer"}},
            },
            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
            "usage": {"type": "null"},
            "klein": {"type": "object", "description": "spent_usd, lines_local, lines_hosted, quote (per line and in total) and the forecast (finish_at, cost_usd)."},
        },
    },
    "BatchList": _page_of("Batch"),
    "BatchCreate": {
        "type": "object",
        "required": ["input_file_id", "endpoint", "completion_window"],
        "properties": {
            "input_file_id": {"type": "string", "description": "A purpose=batch file of the caller's."},
            "endpoint": {"type": "string", "enum": list(BATCH_URLS)},
            "completion_window": {"type": "string", "description": "24h, or a whole number of minutes or hours from 5m to 24h (1h, 6h, 90m)."},
            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string", "maxLength": 512}, "maxProperties": 16},
        },
    },
    "BatchQuote": {
        "type": "object",
        "required": ["object", "total_usd", "lines"],
        "properties": {
            "object": {"const": "batch.quote"},
            "total_usd": {"type": "string", "description": "The scheduler's plan: the local GPU for what it can finish in the window, the cheapest hosted backend for the rest."},
            "all_hosted_usd": {"type": ["string", "null"]},
            "all_local_usd": {"type": ["string", "null"]},
            "lines_local": {"type": "integer"},
            "lines_hosted": {"type": "integer"},
            "local_finish_s": {"type": ["number", "null"]},
            "lines": {"type": "array", "items": {"type": "object"}},
        },
    },
}


def _batch_paths() -> dict[str, Any]:
    """OpenAI's Batch API for images (gateway/http/batches.py)."""
    batch_id = [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    create = {"required": True, "content": {"application/json": {"schema": _schema("BatchCreate")}}}
    statuses = (401, 404, 500, 503)
    return {
        "/v1/batches": {
            "post": {
                "operationId": "createBatch",
                "summary": "Make a batch of a purpose=batch file; answered at once, status validating.",
                "security": AUTH,
                "requestBody": create,
                "responses": {"200": _ok("The batch.", "Batch"), **_errors(400, 401, 404, 415, 500, 503)},
            },
            "get": {
                "operationId": "listBatches",
                "summary": "The caller's batches, newest first, cursor-paginated by `after`.",
                "security": AUTH,
                "parameters": [
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": _ok("The batches.", "BatchList"), **_errors(400, 401, 500, 503)},
            },
        },
        "/v1/batches/quote": {
            "post": {
                "operationId": "quoteBatch",
                "summary": "What a batch of the file would cost, per line and in total, without making it.",
                "security": AUTH,
                "requestBody": create,
                "responses": {"200": _ok("The quote.", "BatchQuote"), **_errors(400, 401, 404, 415, 500, 503)},
            }
        },
        "/v1/batches/{batch_id}": {
            "get": {"operationId": "retrieveBatch", "summary": "One batch.", "security": AUTH, "parameters": batch_id, "responses": {"200": _ok("The batch.", "Batch"), **_errors(*statuses)}}
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                "operationId": "cancelBatch",
                "summary": "No new line starts; running ones are cancelled and settled; the files then hold what was done.",
                "security": AUTH,
                "parameters": batch_id,
                "responses": {"200": _ok("The batch, cancelling.", "Batch"), **_errors(400, *statuses)},
            }
        },
        "/v1/batches/{batch_id}/events": {
            "get": {
                "operationId": "batchEvents",
                "summary": "Server-sent events: the batch object at each change, ending after its terminal state; Last-Event-ID resumes.",
                "security": AUTH,
                "parameters": [*batch_id, {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}}],
                "responses": {
                    "200": _ok("The event stream.", {"type": "string"}, media="text/event-stream"),
                    "204": {"description": "The batch ended at or before Last-Event-ID: nothing more will come.", "headers": {"x-request-id": _header("RequestId")}},
                    **_errors(*statuses),
                },
            }
        },
    }


@cache
def document() -> dict[str, Any]:
    body = ImageBody.model_json_schema(ref_template=_REF)
    defs = body.pop("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Klein Gateway",
            "version": VERSION,
            "description": f"OpenAI-compatible, cost-routing gateway for FLUX.2 [klein] 4B (`{MODEL_ID}`). Every error is OpenAI's envelope; every answer carries `x-request-id`.",
        },
        "paths": _paths(),
        "components": {
            "schemas": {**SCHEMAS, **FILE_SCHEMAS, **BATCH_SCHEMAS, **defs, "ImageBody": body},
            "headers": HEADERS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "One of KLEIN_GATEWAY_KEYS; not needed when none are set."}},
        },
    }


@cache
def document_bytes() -> bytes:
    return msgspec.json.encode(document())


@get("/openapi.json")
async def openapi_document() -> Response[bytes]:
    return Response(document_bytes(), media_type=MediaType.JSON)


ROUTES = [openapi_document]
