"""Idempotency keys (the IETF httpapi `Idempotency-Key` draft), per caller.

The first request with a key claims it atomically in the state store
(`SET NX`, so two replicas never both proceed), runs, and stores its answer:
status, body and the headers that describe it. The same key with the same
request replays that answer with no provider call; while the first is still
running it is 409 `idempotency_key_in_use`; with a different request it is
422 `idempotency_key_reused`. The request is compared by fingerprint:
SHA-256 over method, path, the async preference and the canonical body (JSON
with sorted keys; form fields sorted, files by their digest).

An answer that says "try again" (5xx, 408, 409, 429, 499) is not kept: the
key is released so a retry runs afresh. The exception is an answer after
which a provider may still bill (`x-klein-possibly-billed-usd`, such as 502
`outcome_unknown`): it is kept, so a retry with the same key replays it
instead of paying a provider a second time.

The claim and its read go to the shared store only: while it is away (a
Redis outage that the rest of the gateway rides out in memory) a request
with a key is a retryable 503 `idempotency_unavailable`, as a budgeted
key's is (gateway/money/budgets.py), because each replica's memory would
claim the key for itself and both would pay. Requests without a key run.

An answer sent before its outcome is known (a 504 whose provider job the
deadline left running, gateway/dispatch/followup.py) is deferred: the claim
is held while the job is followed, so a retry meanwhile is 409, and what the
key keeps is decided by the real outcome: the image where it succeeded (the
retry replays it and pays nobody), the 504 where it is still unknown, nothing
(the key is free) where it failed unbilled or billed without an image.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.datastructures import UploadFile

from gateway.domain.errors import GatewayError, InvalidRequest
from gateway.observability.metrics import GatewayMetrics
from gateway.state.base import StateStore, StoreUnavailable

HEADER = "idempotency-key"
MAX_KEY_CHARS = 255
NOT_KEPT = frozenset({408, 409, 429, 499})
KEPT_HEADERS = ("location", "preference-applied", "x-should-retry")
REPLAYED = "idempotent-replayed"
POSSIBLY_BILLED = "x-klein-possibly-billed-usd"
# Spend figures of the original answer: a replay spends nothing, so it says 0
# under these names and carries the original figure under ORIGINAL + name,
# so summing the headers of every answer still equals what was spent.
SPEND_HEADERS = ("x-klein-cost-usd", "x-klein-possibly-billed-usd")
ORIGINAL = "x-klein-original-"
T = TypeVar("T")


class KeyInUse(GatewayError):
    status = 409
    code = "idempotency_key_in_use"
    retryable_default = True


class IdempotencyUnavailable(GatewayError):
    """The shared store is away: a claim in this replica's memory would let
    another replica run the same key too, so the request is refused instead."""

    status = 503
    type = "server_error"
    code = "idempotency_unavailable"
    retryable_default = True


class KeyReused(GatewayError):
    status = 422
    code = "idempotency_key_reused"
    retryable_default = False


def key_of(request: Request[Any, Any, Any]) -> str | None:
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_KEY_CHARS:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters", param="Idempotency-Key", code="invalid_idempotency_key")
    return value


async def fingerprint(request: Request[Any, Any, Any], *, respond_async: bool) -> str:
    digest = hashlib.sha256()
    digest.update(f"{request.method}\n{request.url.path}\n{int(respond_async)}\n".encode())
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        items = []
        try:
            form = await request.form()
        except UnicodeDecodeError:
            raise InvalidRequest("form fields must be UTF-8 text", code="invalid_encoding") from None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((name, "file:" + hashlib.sha256(await value.read()).hexdigest()))
                await value.seek(0)
            else:
                items.append((name, str(value)))
        digest.update(json.dumps(sorted(items)).encode())
    else:
        raw = await request.body()
        try:
            digest.update(json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode())
        except ValueError:
            digest.update(raw)
    return digest.hexdigest()


def kept_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("x-klein-") or k.lower() in KEPT_HEADERS}


def replay_headers(stored: dict[str, str]) -> dict[str, str]:
    """The stored answer's headers as a replay sends them: nothing spent now, the original spend beside it."""
    headers = {k: v for k, v in stored.items() if k.lower() not in SPEND_HEADERS}
    for name, value in stored.items():
        if name.lower() in SPEND_HEADERS:
            headers[ORIGINAL + name.lower().removeprefix("x-klein-")] = value
    headers["x-klein-cost-usd"] = "0"
    headers[REPLAYED] = "true"
    return headers


@dataclass
class Once:
    """What the handler learns from the guard: a stored answer to replay, or
    nothing (this request owns the key and its answer will be kept)."""

    replay: Response[bytes] | None = None
    answer: Response[bytes] | None = None
    claimed: bool = False  # this request owns a key: its answer is kept for the key's TTL
    deferred: bool = False  # what the key keeps is decided later, by `finish`
    _hold: Callable[[float], Awaitable[None]] | None = field(default=None, repr=False)
    _finish: Callable[[int, bytes, dict[str, str]], Awaitable[None]] | None = field(default=None, repr=False)

    def keep(self, response: Response[bytes]) -> Response[bytes]:
        self.answer = response
        return response

    async def defer(self, hold_s: float) -> None:
        """The answer goes out now; the key stays claimed for `hold_s` until `finish` says what it keeps."""
        self.deferred = True
        if self._hold is not None:
            await self._hold(hold_s)

    async def finish(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Keep the deferred request's final answer under its key (or free the key, by the usual rule)."""
        if self._finish is not None:
            await self._finish(status, body, headers)


@dataclass
class Idempotency:
    store: StateStore
    metrics: GatewayMetrics
    ttl_s: float = 86400.0

    @staticmethod
    def _slot(caller: str | None, key: str) -> str:
        return f"idem:{caller or '-'}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    @asynccontextmanager
    async def guard(self, request: Request[Any, Any, Any], caller: str | None, *, respond_async: bool, running_ttl_s: float) -> AsyncIterator[Once]:
        """Claim the request's key for the block (if it has one), or replay."""
        key = key_of(request)
        once = Once()
        if key is None:
            yield once
            return
        slot = self._slot(caller, key)
        fp = await fingerprint(request, respond_async=respond_async)
        claim = json.dumps({"fp": fp, "state": "running"})
        for _ in range(3):
            if await self._shared(self.store.set_if_absent_shared(slot, claim, ttl_s=running_ttl_s)):
                break
            raw = await self._shared(self.store.get_shared(slot))
            if raw is None:
                continue  # it expired between the two calls: claim again
            stored = json.loads(raw)
            if stored.get("fp") != fp:
                self.metrics.record_idempotency("reused")
                raise KeyReused("this Idempotency-Key was used with a different request", param="Idempotency-Key")
            if stored.get("state") != "done":
                self.metrics.record_idempotency("in_use")
                raise KeyInUse("a request with this Idempotency-Key is still running; retry shortly", param="Idempotency-Key", retry_after=1)
            self.metrics.record_idempotency("replayed")
            once.replay = Response(base64.b64decode(stored["body"]), status_code=stored["status"], media_type=stored.get("media_type") or "application/json", headers=replay_headers(stored["headers"]))
            yield once
            return
        else:
            raise KeyInUse("a request with this Idempotency-Key is still running; retry shortly", param="Idempotency-Key", retry_after=1)
        self.metrics.record_idempotency("original")
        once.claimed = True
        once._hold = lambda ttl_s: self.store.set(slot, claim, ttl_s=ttl_s)
        once._finish = lambda status, body, headers: self._settle(slot, fp, status, body, headers)
        try:
            yield once
        except GatewayError as err:
            if not once.deferred:
                await self._settle(slot, fp, err.status, msgspec.json.encode(err.envelope()), {**getattr(request.state, "klein_headers", {}), **err.headers()})
            raise
        except BaseException:
            if not once.deferred:
                await self.store.delete(slot)
            raise
        answer = once.answer
        if answer is None:
            await self.store.delete(slot)
            return
        body = answer.content if isinstance(answer.content, bytes) else str(answer.content).encode()
        await self._settle(slot, fp, answer.status_code or 200, body, dict(answer.headers))

    async def _shared(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreUnavailable:
            self.metrics.record_idempotency("unavailable")
            raise IdempotencyUnavailable("the shared idempotency store is unreachable, so this Idempotency-Key cannot be honoured; retry shortly", param="Idempotency-Key", retry_after=1) from None

    async def _settle(self, slot: str, fp: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        may_be_billed = headers.get(POSSIBLY_BILLED, "0") not in ("", "0")
        if (status >= 500 or status in NOT_KEPT) and not may_be_billed:
            await self.store.delete(slot)
            return
        stored = {"fp": fp, "state": "done", "status": status, "body": base64.b64encode(body).decode(), "headers": kept_headers(headers), "media_type": "application/json"}
        await self.store.set(slot, json.dumps(stored), ttl_s=self.ttl_s)
