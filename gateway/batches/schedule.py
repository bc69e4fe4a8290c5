"""Which lines of a batch the local GPU runs and which go to hosted backends: the pure policy.

Why: a batch only has to be done by its deadline, so the cheapest plan is to
give the local GPU (whose marginal cost is power, about $0.0004 per 1 MP image)
as much of it as it can finish in time, and to pay a hosted backend (about
$0.001-0.015 per image) only for the rest.

The rules of `split` (the driver calls it every tick with the lines not yet started):
- a line the local backend cannot do spills; a line no hosted backend can do
  stays local whatever the capacity (it has nowhere else to go), first in line;
- a line whose local price is not below its hosted price spills (nothing saved);
- the rest are ranked by saving per unit of GPU work, `(hosted - local) / work_mp`,
  highest first (ties: line index), and kept local while they fit the capacity
  `rate x (seconds_left - margin) - work already queued on the GPU`; one that does
  not fit spills, and the next, smaller, may still fit (so the GPU's last
  minutes are not left idle);
- no known throughput (`rate_mp_s <= 0`): every line that can spill spills.

Why lazy spilling is safe: a hosted backend takes any number of lines at once
and finishes each in seconds, so a line need not leave the local plan until
the GPU could no longer finish it before `deadline - margin`. Re-planning each
tick with the measured rate spills exactly the lines that stopped fitting, and
only the lines already handed to the GPU are committed. The asymmetry matters
for the rate: overestimating it costs nothing (the excess is spilled later, at
the same price), underestimating spills lines for good, so `LocalRate` errs high.

Money is Decimal; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

USD_QUANTUM = Decimal("0.00000001")  # the gateway's money: 8 places, half up (as gateway.routing.pricing.usd)
MARGIN_S = 60.0  # kept free before the deadline (margin_s says why so little)
MAX_MARGIN_SHARE = 0.2  # a short window keeps at least 80% of itself for work
ENOUGH_LINES = 3  # LocalRate measures once this many lines finished ...
ENOUGH_BUSY_S = 2.0  # ... over at least this much busy time
OPTIMISM = 0.3  # LocalRate's measured rate is raised by OPTIMISM / sqrt(lines finished)


@dataclass(frozen=True, slots=True)
class LineCost:
    line: int  # the line's index in the batch (0-based)
    work_mp: float  # GPU work: output megapixels x n x steps/4 (what the local GPU's rate is measured in)
    local_usd: Decimal | None  # the local backend's quote; None: local cannot do it
    hosted_usd: Decimal | None  # the cheapest eligible hosted backend's quote; None: no hosted backend can
    hosted_backend: str | None  # that backend's name


@dataclass(frozen=True, slots=True)
class Split:
    local: tuple[int, ...]  # line indexes planned for the local GPU, in the order to run them (largest saving per GPU-second first)
    spill: tuple[int, ...]  # line indexes to send to hosted backends now
    forecast_usd: Decimal  # what the pending lines will cost under this split
    forecast_finish_s: float  # seconds from now until the local GPU finishes its planned lines (0 when none), given the rate and what it already has queued


def margin_s(window_s: float) -> float:
    """The time kept free before the deadline: 60 s, or a fifth of a window shorter than 5 minutes
    (5 min, 1 h, 6 h, 24 h: 60 s; 2 min: 24 s).

    It covers only what re-planning cannot undo: the few lines already on the
    GPU running slower than measured (seconds, for lines of under a minute), and
    the hosted latency of the lines spilled last, with room for one failed
    attempt and a retry elsewhere (hosted request timeouts are 30 s; a line
    spills at least its own GPU time before `deadline - margin`). None of that
    grows with the window, and the rate is re-measured all along, so the margin
    does not either: every second of it is GPU time paid for at hosted prices
    (on a 6 h window of 0.1 MP/s, 1 s is about 0.02% of the batch's cost)."""
    if window_s <= 0:
        return 0.0
    return min(MARGIN_S, MAX_MARGIN_SHARE * window_s)


def _classify(lines: Sequence[LineCost]) -> tuple[list[LineCost], list[LineCost], list[tuple[LineCost, Decimal, Decimal]]]:
    """(must run locally, must or should spill, the candidates for the GPU with their local and
    hosted prices, ranked by saving per MP of work, best first; a line of no work ranks first)."""
    forced: list[LineCost] = []
    spill: list[LineCost] = []
    keyed: list[tuple[float, int, LineCost, Decimal, Decimal]] = []
    for c in lines:
        local, hosted = c.local_usd, c.hosted_usd
        if local is None:
            spill.append(c)
        elif hosted is None:
            forced.append(c)
        elif local >= hosted:
            spill.append(c)
        else:
            per_mp = float(hosted - local) / c.work_mp if c.work_mp > 0 else math.inf
            keyed.append((-per_mp, c.line, c, local, hosted))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return forced, spill, [(c, local, hosted) for _, _, c, local, hosted in keyed]


def _price(value: Decimal | None) -> Decimal:
    return value if value is not None else Decimal(0)  # a line no backend can do costs nothing: the driver fails it


def split(pending: Sequence[LineCost], *, seconds_left: float, rate_mp_s: float, local_queued_mp: float, margin_s: float) -> Split:
    """The lines to keep planned for the local GPU (in run order) and those to spill now.

    `local_queued_mp`: the work of the lines already released to the local
    backend and not finished, less what the GPU has done of them
    (`LocalRate.partial_mp`): what it must get through before any line planned
    here. Deterministic for equal inputs, whatever their order."""
    forced, spill, ranked = _classify(pending)
    local = list(forced)
    planned = sum(c.work_mp for c in forced)
    if rate_mp_s <= 0:
        spill.extend(c for c, _, _ in ranked)
    else:
        room = rate_mp_s * max(0.0, seconds_left - margin_s) - local_queued_mp - planned
        for c, _, _ in ranked:
            if c.work_mp <= room:
                local.append(c)
                room -= c.work_mp
                planned += c.work_mp
            else:
                spill.append(c)
    forecast = sum((_price(c.local_usd) for c in local), Decimal(0)) + sum((_price(c.hosted_usd) for c in spill), Decimal(0))
    queued = local_queued_mp + planned
    if queued <= 0:
        finish = 0.0
    elif rate_mp_s <= 0:
        finish = math.inf
    else:
        finish = queued / rate_mp_s
    return Split(local=tuple(c.line for c in local), spill=tuple(sorted(c.line for c in spill)), forecast_usd=forecast, forecast_finish_s=finish)


class LocalRate:
    """The local GPU's sustained throughput in MP/s, learnt from the lines it finishes: starts at a prior, then measured.

    "Enough" is 3 lines finished over at least 2 s of busy time; before that the
    prior is returned. Then: the work finished over the whole batch divided by
    the busy time up to the last completion (time with nothing in flight is not
    counted, nor the partial time of the lines still running), raised by
    `OPTIMISM / sqrt(lines)` (0.3: about five standard errors of the mean for
    lines whose times vary by +-10%; +17% after 3 lines, +1% after 900).
    Whole-batch rather than recent-weighted, and erring high, because the two
    errors cost differently: a rate read high keeps lines planned local that are
    spilled a little later at the same price, a rate read low (a noisy recent
    window dipping) spills lines for good. A GPU that slows for good is followed
    slowly, as the mean moves; lateness only needs the lines already on it to
    fit the margin. For the same reason the prior should err high: a low one
    spills lines at the first tick, before anything is measured.

    Feed it the driver's monotonic clock: `busy(now, in_flight > 0)` each tick and
    whenever the GPU gains or loses its last line, `completed(work_mp, now)` as
    each local line finishes. It never reads a clock itself."""

    def __init__(self, prior_mp_s: float) -> None:
        self.prior_mp_s = prior_mp_s
        self._busy = False
        self._since: float | None = None  # when the last call was
        self._unattributed_s = 0.0  # busy time since the last completion
        self._busy_s = 0.0  # busy time up to the last completion
        self._work_mp = 0.0
        self._lines = 0

    def _advance(self, now: float) -> None:
        if self._busy and self._since is not None and now > self._since:
            self._unattributed_s += now - self._since
        if self._since is None or now > self._since:
            self._since = now

    def busy(self, now: float, busy: bool) -> None:
        """Whether the GPU has lines in flight from `now` on; the time since the last call counts as it was."""
        self._advance(now)
        self._busy = busy

    def completed(self, work_mp: float, now: float) -> None:
        """A local line of `work_mp` finished at `now`."""
        self._advance(now)
        self._busy_s += self._unattributed_s
        self._unattributed_s = 0.0
        self._work_mp += work_mp
        self._lines += 1

    @property
    def lines(self) -> int:
        return self._lines

    @property
    def partial_mp(self) -> float:
        """The work the GPU has probably done on the lines still in flight: its busy time since the
        last completion at the estimated rate. Take it off the work released and not finished for
        `split`'s `local_queued_mp`, else the part of a long line already run is planned twice."""
        return self._unattributed_s * self.mp_per_s

    @property
    def measured(self) -> bool:
        """Enough has been seen to trust the measurement over the prior."""
        return self._lines >= ENOUGH_LINES and self._busy_s >= ENOUGH_BUSY_S

    @property
    def mp_per_s(self) -> float:
        if not self.measured:
            return self.prior_mp_s
        return self._work_mp / self._busy_s * (1 + OPTIMISM / math.sqrt(self._lines))


def oracle_usd(lines: Sequence[LineCost], *, window_s: float, rate_mp_s: float) -> Decimal:
    """The cost with every price and the GPU's true rate known, no margin: the capacity
    `rate x window` filled by saving per unit of work, the line at the boundary
    split by its fraction (the fractional-knapsack greedy bound).

    No schedule of whole lines can cost less; it is exact when lines are small
    against the capacity, which a batch's lines are. Lines no hosted backend can
    do run locally whatever the capacity, as in `split`."""
    forced, spill, ranked = _classify(lines)
    total = sum((_price(c.local_usd) for c in forced), Decimal(0)) + sum((_price(c.hosted_usd) for c in spill), Decimal(0))
    room = max(0.0, rate_mp_s) * max(0.0, window_s) - sum(c.work_mp for c in forced)
    for c, local, hosted in ranked:
        if c.work_mp <= room:
            total += local
            room -= c.work_mp
        elif room > 0:
            share = Decimal(room / c.work_mp)
            total += share * local + (1 - share) * hosted
            room = 0.0
        else:
            total += hosted
    return total.quantize(USD_QUANTUM, rounding=ROUND_HALF_UP)
