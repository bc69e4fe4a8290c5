"""The async image job: what is stored, what the caller sees, how it moves.

A `JobRecord` holds everything a worker on any replica needs to run the job
(the validated `ImageJob`, serialised), what happened so far (status,
attempts, spend, the provider job ids submitted), and the public job object
the API answers with. Records are JSON so every store keeps them the same way.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Literal

from gateway.domain.job import ImageJob, JobKind, ProviderPrefs, ReferenceImage, SizeIntent
from gateway.routing.pricing import usd_text

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
ID_PREFIX = "imgjob_"


def new_job_id(now: float | None = None) -> str:
    """`imgjob_` + 12 hex digits of milliseconds + 16 hex digits: a 4-digit
    sequence and 12 random ones.

    Ids sort by creation time, so an owner's listing is a range over ids and
    the `after` cursor is simply the last id seen. Jobs made in the same
    millisecond by this process sort in the order they were made (the
    sequence), not by chance; the random part keeps replicas' ids apart."""
    global _last_id_ms, _id_seq
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        if ms == _last_id_ms:
            _id_seq = (_id_seq + 1) & 0xFFFF
        else:
            _last_id_ms, _id_seq = ms, 0
        seq = _id_seq
    return f"{ID_PREFIX}{ms:012x}{seq:04x}{secrets.token_hex(6)}"


_id_lock = threading.Lock()
_last_id_ms = -1
_id_seq = 0


def job_to_dict(job: ImageJob) -> dict[str, Any]:
    """An ImageJob as JSON-safe data (reference bytes in base64, prices as text)."""
    data = asdict(job)
    data["kind"] = job.kind.value
    data["references"] = [
        {"content_type": r.content_type, "data": base64.b64encode(r.data).decode() if r.data is not None else None, "url": r.url, "width": r.width, "height": r.height} for r in job.references
    ]
    prefs = job.prefs
    data["prefs"] = {
        "order": list(prefs.order),
        "only": list(prefs.only),
        "ignore": list(prefs.ignore),
        "max_price": str(prefs.max_price) if prefs.max_price is not None else None,
        "allow_fallbacks": prefs.allow_fallbacks,
    }
    return data


def job_from_dict(data: dict[str, Any]) -> ImageJob:
    refs = tuple(
        ReferenceImage(content_type=r["content_type"], data=base64.b64decode(r["data"]) if r.get("data") is not None else None, url=r.get("url"), width=r.get("width"), height=r.get("height"))
        for r in data.get("references", [])
    )
    p = data.get("prefs") or {}
    prefs = ProviderPrefs(
        order=tuple(p.get("order", ())),
        only=tuple(p.get("only", ())),
        ignore=tuple(p.get("ignore", ())),
        max_price=Decimal(p["max_price"]) if p.get("max_price") is not None else None,
        allow_fallbacks=p.get("allow_fallbacks", True),
    )
    s = data.get("size_intent") or {}
    intent = SizeIntent(exact=s.get("exact", True), ratio=tuple(s["ratio"]) if s.get("ratio") else None)  # JSON gives a list of two ints
    fields = {k: v for k, v in data.items() if k not in ("kind", "references", "prefs", "size_intent")}
    return ImageJob(kind=JobKind(data["kind"]), references=refs, prefs=prefs, size_intent=intent, **fields)


@dataclass(slots=True)
class Webhook:
    url: str
    attempts: int = 0
    delivered: bool = False
    last_status: int | None = None  # the receiver's last HTTP status; None: no answer yet
    refusal: str | None = None  # why the delivery was given up without a try (the address policy refused it)

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "attempts": self.attempts, "delivered": self.delivered, "last_status": self.last_status}


@dataclass(slots=True)
class JobRecord:
    id: str
    owner: str | None  # the caller key id that made it; None when the gateway runs open
    route: str  # "generations" or "edits", for metrics and logs
    job: dict[str, Any]  # job_to_dict(ImageJob)
    base_url: str  # where gateway-served image URLs point
    created: float  # unix seconds, with fraction: the deadline runs from here
    status: Status = "queued"
    completed: float | None = None
    backend: str | None = None
    cost_usd: Decimal | None = None
    attempts: int = 0  # attempts on backends, across every run of the job
    result: dict[str, Any] | None = None  # exactly the synchronous answer's body
    error: dict[str, Any] | None = None  # the OpenAI error object
    metadata: dict[str, str] | None = None
    webhook: Webhook | None = None
    provider_jobs: dict[str, list[str]] = field(default_factory=dict)  # backend -> job ids submitted and not yet settled
    runs: int = 0  # times a worker has started the job (more than one after a crash)
    reservation: dict[str, Any] | None = None  # the owner's budget held for the run in progress: {"units", "windows"}; settled by whoever ends it
    cancel_requested: float | None = None  # unix seconds: its owner asked to cancel while it ran; it ends `canceled` once its provider work is settled
    batch: dict[str, Any] | None = None  # a batch line's job: {"id": the batch, "custom_id", "index"}; not listed among the owner's jobs
    status_code: int | None = None  # the HTTP status the synchronous call would have answered, once ended
    version: int = 0  # the store's count of writes: 1 when created, one more on every update that writes; the `id:` of the job's events

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def image_job(self) -> ImageJob:
        return job_from_dict(self.job)

    def public(self) -> dict[str, Any]:
        """The job object of the API contract."""
        return {
            "id": self.id,
            "object": "image.job",
            "status": self.status,
            "created": int(self.created),
            "completed": int(self.completed) if self.completed is not None else None,
            "backend": self.backend,
            "cost_usd": usd_text(self.cost_usd) if self.cost_usd is not None else None,
            "attempts": self.attempts,
            "result": self.result,
            "error": self.error,
            "metadata": self.metadata,
            "webhook": self.webhook.public() if self.webhook else None,
            "cancel_requested_at": int(self.cancel_requested) if self.cancel_requested is not None else None,
        }

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["cost_usd"] = str(self.cost_usd) if self.cost_usd is not None else None
        data["webhook"] = asdict(self.webhook) if self.webhook else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        """A stored record. Fields this version does not know are left out, so
        replicas of two versions can share one store during a rolling upgrade
        (a newer one may add fields; an older one's records lack them and take the defaults)."""
        data = {k: v for k, v in data.items() if k in cls.__slots__}
        data["cost_usd"] = Decimal(data["cost_usd"]) if data.get("cost_usd") is not None else None
        data["webhook"] = Webhook(**data["webhook"]) if data.get("webhook") else None
        return cls(**data)
