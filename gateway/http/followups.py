"""Settle a request whose answer went out before its provider job ended.

When the request's deadline passes while a provider job runs, the caller gets
its 504 at the deadline, and the job goes on (a cancel would not unbill it).
This module follows it to its end in the background (gateway/dispatch/followup.py)
and then settles the request exactly once with the real outcome: the budget
reservation (held until then), the ledger row (status 504, or 499 if the
caller had left, with the real cost), and the Idempotency-Key's stored answer,
which becomes the image where the job succeeded, so a retry with the key gets
it and pays nobody. The follow-up is tracked like a request in flight, so a
graceful shutdown waits for it within its grace (docs/design.md#deadlines-cancellation-and-double-spend).
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import msgspec

from gateway.dispatch.answer import images_body, klein_headers
from gateway.dispatch.attempts import DispatchFailed, Outcome, tried
from gateway.dispatch.followup import Followed, follow, outcome_of, spent
from gateway.domain.job import ImageJob
from gateway.money.idempotency import Once
from gateway.money.tab import Tab
from gateway.routing.pricing import usd_text
from gateway.service import Gateway

log = logging.getLogger(__name__)

HOLD_SLACK_S = 60.0  # the Idempotency-Key's claim outlives the follow-up by this much


def follow_up(gw: Gateway, err: DispatchFailed, *, tab: Tab, once: Once, job: ImageJob, request_id: str, status: int, base_url: str, keep_images_s: int | None) -> asyncio.Task[None]:
    """Start following `err.unsettled`; the returned task settles everything when they end."""
    task = asyncio.get_running_loop().create_task(_settle_when_known(gw, err, tab=tab, once=once, job=job, request_id=request_id, status=status, base_url=base_url, keep_images_s=keep_images_s))
    gw.follow_ups.add(task)
    task.add_done_callback(gw.follow_ups.discard)
    gw.drain.track(task)  # a graceful shutdown waits for it within its grace, then cancels it
    return task


async def _settle_when_known(gw: Gateway, err: DispatchFailed, *, tab: Tab, once: Once, job: ImageJob, request_id: str, status: int, base_url: str, keep_images_s: int | None) -> None:
    followed: list[Followed] = []
    try:
        for unsettled in err.unsettled:
            followed.append(await follow(gw.dispatcher, unsettled, base_url=base_url, keep_images_s=keep_images_s))
    except asyncio.CancelledError:
        log.warning("request %s: the shutdown ended the follow-up of its provider job; it is counted as possibly billed", request_id)
        raise
    except Exception as exc:  # noqa: BLE001 - settle with what is known rather than never
        log.warning("request %s: following its provider job failed (%s); counted as possibly billed", request_id, type(exc).__name__)
    finally:
        await asyncio.shield(_settle(gw, err, followed, tab=tab, once=once, job=job, request_id=request_id, status=status))


async def _settle(gw: Gateway, err: DispatchFailed, followed: list[Followed], *, tab: Tab, once: Once, job: ImageJob, request_id: str, status: int) -> None:
    outcome = outcome_of(err, followed)
    cost, possibly = spent(err, followed)
    known = {u.backend for u in err.unsettled[: len(followed)]}
    possibly += sum((u.possibly_usd for u in err.unsettled[len(followed) :]), Decimal(0))  # never learnt
    for left in err.unsettled[len(followed) :]:  # never learnt: possibly billed, as dispatch would have counted it
        gw.metrics.record_possibly_billed(backend=left.backend, usd=left.possibly_usd)
    attempts = tried(err.attempts)
    backend = outcome.backend if outcome is not None else (followed[-1].backend if followed else None)
    try:
        await gw.billing.settle(
            tab,
            status=status,
            backend=backend,
            attempts=attempts,
            images=len(outcome.images) if outcome is not None else 0,
            cost=cost,
            billed=gw.billed_figure(outcome),
            megapixels=outcome.megapixels if outcome is not None else None,
        )
    finally:
        if once.claimed:
            await _keep_answer(once, err, outcome, request_id=request_id, job=job, cost=cost, possibly=possibly)
    log.info("request %s: its provider job (%s) ended after the answer; settled at %s USD", request_id, ",".join(sorted(known)) or "-", usd_text(cost))


async def _keep_answer(once: Once, err: DispatchFailed, outcome: Outcome | None, *, request_id: str, job: ImageJob, cost: Decimal, possibly: Decimal) -> None:
    """What the Idempotency-Key keeps: the image if the job made one, the 504 if still unknown, else nothing."""
    if outcome is not None:
        await once.finish(200, msgspec.json.encode(images_body(job, outcome)), klein_headers(request_id, outcome))
        return
    headers: dict[str, Any] = {"x-request-id": request_id, "x-klein-cost-usd": usd_text(cost), "x-klein-attempts": str(tried(err.attempts)), **err.headers()}
    if possibly:
        headers["x-klein-possibly-billed-usd"] = usd_text(possibly)
    await once.finish(err.status, msgspec.json.encode(err.envelope()), headers)
