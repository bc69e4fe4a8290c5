"""The body and headers of a successful images answer.

One definition for the synchronous answer and an async job's `result`, so
the two are the same by construction.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.dispatch.attempts import Outcome
from gateway.domain.job import ImageJob
from gateway.routing.pricing import usd_text


def images_body(job: ImageJob, outcome: Outcome, created: float | None = None) -> dict[str, Any]:
    """`size` (and each image's) is what was produced: a request for a shape may get the backend's native size."""
    produced = outcome.size or job.size
    return {
        "created": int(time.time() if created is None else created),
        "data": [img.as_openai() | {"size": f"{img.size[0]}x{img.size[1]}" if img.size else produced} for img in outcome.images],
        "output_format": job.output_format,
        "size": produced,
    }


def klein_headers(request_id: str, outcome: Outcome) -> dict[str, str]:
    """x-request-id and the x-klein-* figures of a served request."""
    headers = {
        "x-request-id": request_id,
        "x-klein-backend": outcome.backend,
        "x-klein-cost-usd": usd_text(outcome.cost_usd),
        "x-klein-attempts": str(outcome.tried),
    }
    if outcome.billed_usd is not None:
        headers["x-klein-billed-usd"] = usd_text(outcome.billed_usd)
    if outcome.possibly_billed_usd:
        headers["x-klein-possibly-billed-usd"] = usd_text(outcome.possibly_billed_usd)
    if any(img.nsfw for img in outcome.images):
        headers["x-klein-nsfw"] = ",".join(str(i) for i, img in enumerate(outcome.images) if img.nsfw)
    return headers
