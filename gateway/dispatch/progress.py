"""What one request's dispatch has done so far, readable by whoever started it.

Dispatch fills it in as it goes, so the request handler learns two things even
when dispatch never returns (it was cancelled): whether the work was handed to
a provider (from then on an attempt may bill, so a caller who leaves no longer
stops it: docs/design.md#abandoned-requests), and what the attempts before a
cancel spent, so that money still reaches the budget, the ledger and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass(slots=True)
class Progress:
    handed_over: bool = False  # an attempt has called a provider's generate
    attempts: list[Any] = field(default_factory=list)  # gateway.dispatch.attempts.Attempt, as recorded
    spent: Decimal = Decimal(0)  # surely billed so far
    possibly_billed: Decimal = Decimal(0)
    upstream_s: float = 0.0
