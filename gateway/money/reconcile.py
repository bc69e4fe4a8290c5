"""The provider's billed figure beside the gateway's estimate.

Where a provider says what it billed (Runflow's run `cost`; the local GPU
service's `cost_usd_estimate`, its measured share of GPU seconds), the
gateway keeps both figures: `x-klein-cost-usd` and the ledger's
`estimated_usd` stay the gateway's (from the price sheet), the provider's
goes to `x-klein-billed-usd`, the ledger's `billed_usd`, and
`klein_billed_usd_total{backend, source}`. The estimate for the same requests
is `klein_billed_estimate_usd_total{backend, source}`, so the drift
(billed / estimate - 1, over an hour) compares like with like; the alert
`KleinBilledCostDrift` fires past 5% (deploy/prometheus/alerts.yml).

fal, Replicate and EmpirioLabs report no cost in their answers (see their
protocol notes in gateway/providers/), so they have no billed series.
"""

from __future__ import annotations

# Where each kind's billed figure comes from, as the `source` label says it.
SOURCES = {"runflow": "run_cost", "local": "gpu_seconds"}


def billed_source(kind: str) -> str:
    return SOURCES.get(kind, "provider_reported")
