"""What one request's dispatch has done so far, readable by whoever started it.

Dispatch fills it in as it goes, so the request handler learns two things even
when dispatch never returns (it was cancelled): whether the work was handed to
a provider (from then on an attempt may bill, so a caller who leaves no longer
stops it: docs/design.md#abandoned-requests), and what the attempts before a
cancel spent, so that money still reaches the budget, the ledger and metrics.

`Unsettled` is a provider job the request's deadline left running: the
caller is answered at the deadline, and the job's real outcome is learnt
afterwards (gateway/dispatch/followup.py), so its money is settled, not guessed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.domain.job import ImageJob


@dataclass(slots=True)
class Progress:
    handed_over: bool = False  # an attempt has called a provider's generate
    attempts: list[Any] = field(default_factory=list)  # gateway.dispatch.attempts.Attempt, as recorded
    spent: Decimal = Decimal(0)  # surely billed so far
    possibly_billed: Decimal = Decimal(0)
    upstream_s: float = 0.0
    stop_requested: bool = False  # the owner cancelled: no further attempt starts (the one running ends)


@dataclass(frozen=True, slots=True)
class Unsettled:
    """A submitted provider job whose outcome the request's deadline cut off."""

    backend: str
    job: ImageJob  # as that backend was asked to serve it
    job_ids: tuple[str, ...]
    possibly_usd: Decimal  # what it costs if it was billed: the answer's x-klein-possibly-billed-usd share
    cancel: asyncio.Task[bool | None] | None = field(default=None, compare=False)  # the cancel sent at the deadline, still answering
