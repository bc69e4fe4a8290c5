"""Files: a blob in the image store and a record in the state store, per upload.

Keys (logical; a Redis store adds `klein:<namespace>:`):

- `file:<id>`: the record (JSON), with a TTL that ends when the file expires.
- `files:of:<owner>`: the owner's index, a JSON list of `[created_at, id, expires_at]`,
  replaced by compare-and-set (so two replicas adding files at once both
  land), pruned of expired entries on every write. Listing reads it and then
  the records in one round trip.

The blob is written first and outlives the record by a minute, so a record
anyone can read always has its bytes. The record is created with
`set_if_absent_shared`: while the shared store is unreachable an upload is
refused (503) rather than kept in one replica's memory, where the other
replicas would answer 404 for it. A file belongs to the caller key that
uploaded it; to any other it does not exist.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import random
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.config import GatewaySettings
from gateway.domain.errors import GatewayError, InvalidRequest
from gateway.images import ImageStore
from gateway.images.base import new_blob_name
from gateway.state.base import StateStore, StoreUnavailable

# What an upload may be for: `batch` is checked line by line (gateway.files.batch_input);
# `vision` and `user_data` are kept as opaque bytes (reference images, say) and never parsed.
PURPOSES = ("batch", "vision", "user_data")
MAX_FILES_PER_OWNER = 10_000  # OpenAI's largest list page; the index stays one small value
MAX_FILENAME_CHARS = 255
BLOB_SLACK_S = 60  # how long a blob outlives its record
_INDEX_TRIES = 32  # compare-and-set rounds, jittered, before an upload gives up (503)
_ID = re.compile(r"^file-[0-9a-f]{24}$")
Order = Literal["asc", "desc"]


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def valid_file_id(file_id: str) -> bool:
    return bool(_ID.match(file_id))


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    owner: str | None
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int
    blob: str
    status: str = "processed"  # checked before it was stored: there is no later processing

    def public(self) -> dict[str, Any]:
        """OpenAI's file object, field for field."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "status_details": None,
            "expires_at": self.expires_at,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> FileRecord:
        return cls(**json.loads(raw))


class FileStoreUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "file_store_unavailable"
    retryable_default = True


@contextlib.contextmanager
def reachable() -> Iterator[None]:
    """An outage of the state store or the blob store is a 503 the caller may retry."""
    try:
        yield
    except GatewayError:
        raise
    except (StoreUnavailable, OSError, ConnectionError, TimeoutError) as exc:
        raise FileStoreUnavailable("the file store is unavailable; retry shortly", retry_after=1) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("redis", "obstore"):
            raise FileStoreUnavailable("the file store is unavailable; retry shortly", retry_after=1) from exc
        raise


def clean_filename(name: str | None) -> str:
    """The upload's name without any directory part, bounded; `upload` when it has none."""
    base = re.split(r"[\\/]", name or "")[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable())
    return base[:MAX_FILENAME_CHARS] or "upload"


class Files:
    def __init__(self, state: StateStore, blobs: ImageStore, settings: GatewaySettings, *, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.blobs = blobs
        self.settings = settings
        self.clock = clock

    @staticmethod
    def _owner(owner: str | None) -> str:
        return owner if owner is not None else "-"  # an open gateway: every caller is the same one

    def _index_key(self, owner: str | None) -> str:
        return f"files:of:{self._owner(owner)}"

    async def create(self, owner: str | None, *, filename: str | None, purpose: str, data: bytes, expires_after_s: int | None = None) -> FileRecord:
        now = int(self.clock())
        lifetime = expires_after_s if expires_after_s is not None else self.settings.file_retention_s
        expires_at = now + lifetime
        record = FileRecord(
            id=new_file_id(), owner=owner, bytes=len(data), created_at=now, filename=clean_filename(filename), purpose=purpose, expires_at=expires_at, blob=new_blob_name(expires_at + BLOB_SLACK_S)
        )
        with reachable():
            index = await self.state.get(self._index_key(owner))
            if len(self._live(index, now)) >= MAX_FILES_PER_OWNER:
                raise InvalidRequest(f"this key holds {MAX_FILES_PER_OWNER:,} files, the most it may; delete some first", param="file", code="too_many_files")
            await self.blobs.put_blob(record.blob, data)
            try:
                created = await self.state.set_if_absent_shared(f"file:{record.id}", record.to_json(), ttl_s=lifetime)
            except BaseException:
                await self.blobs.delete_blob(record.blob)
                raise
            if not created:  # 96 random bits met an existing id: not in this universe, but never overwrite
                await self.blobs.delete_blob(record.blob)
                raise FileStoreUnavailable("could not store the file; retry", retry_after=1)
            try:
                await self._change_index(owner, lambda entries: [*entries, [record.created_at, record.id, record.expires_at]])
            except BaseException:  # a file the list would never show is not made at all
                await self.state.delete(f"file:{record.id}")
                await self.blobs.delete_blob(record.blob)
                raise
        return record

    async def get(self, owner: str | None, file_id: str) -> FileRecord | None:
        """The record when it exists, has not expired and belongs to `owner`; else None."""
        if not valid_file_id(file_id):
            return None
        with reachable():
            raw = await self.state.get(f"file:{file_id}")
        if raw is None:
            return None
        record = FileRecord.from_json(raw)
        if record.owner != owner or record.expires_at <= self.clock():
            return None
        return record

    async def content(self, owner: str | None, file_id: str) -> tuple[FileRecord, bytes] | None:
        record = await self.get(owner, file_id)
        if record is None:
            return None
        with reachable():
            data = await self.blobs.get_blob(record.blob)
        return None if data is None else (record, data)

    async def delete(self, owner: str | None, file_id: str) -> bool:
        record = await self.get(owner, file_id)
        if record is None:
            return False
        with reachable():
            await self.state.delete(f"file:{file_id}")
            await self.blobs.delete_blob(record.blob)
            try:
                await self._change_index(owner, lambda entries: [e for e in entries if e[1] != file_id])
            except FileStoreUnavailable:
                pass  # the file is gone; listing skips an entry without a record, and it ages out with the file's expiry
        return True

    async def list(self, owner: str | None, *, purpose: str | None = None, limit: int = 10_000, after: str | None = None, order: Order = "desc") -> tuple[list[FileRecord], bool]:
        """The owner's live files by created_at (then id) in `order`, those after the file `after`; and whether more follow."""
        now = self.clock()
        with reachable():
            entries = self._live(await self.state.get(self._index_key(owner)), now)
            raws = await self.state.get_many([f"file:{e[1]}" for e in entries]) if entries else []
        records = [FileRecord.from_json(raw) for raw in raws if raw is not None]
        records = [r for r in records if r.owner == owner and r.expires_at > now and (purpose is None or r.purpose == purpose)]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=order == "desc")
        if after is not None:
            position = next((i for i, r in enumerate(records) if r.id == after), None)
            if position is None:
                raise InvalidRequest(f"after: no file {after!r} among this key's files to list after", param="after", code="invalid_value")
            records = records[position + 1 :]
        return records[:limit], len(records) > limit

    @staticmethod
    def _live(raw: str | None, now: float) -> builtins.list[builtins.list[Any]]:
        entries = json.loads(raw) if raw else []
        return [e for e in entries if e[2] > now]

    async def _change_index(self, owner: str | None, change: Callable[[builtins.list[builtins.list[Any]]], builtins.list[builtins.list[Any]]]) -> None:
        key = self._index_key(owner)
        ttl_s = self.settings.file_retention_s + BLOB_SLACK_S
        for attempt in range(_INDEX_TRIES):
            raw = await self.state.get(key)
            entries = change(self._live(raw, self.clock()))
            if await self.state.compare_and_set(key, raw, json.dumps(entries, separators=(",", ":")), ttl_s=ttl_s):
                return
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))  # lost a race: let the others land first
        raise FileStoreUnavailable("the file index is busy; retry", retry_after=1)
