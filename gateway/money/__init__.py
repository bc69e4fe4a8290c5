"""Money per caller: keys, budgets, rate limits, the request's tab, idempotency, the ledger.

May import routing (prices), observability, state and domain.
"""
