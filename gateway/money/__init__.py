"""Money per caller: keys, budgets, rate limits, the request's tab, idempotency, the ledger.

May import routing (prices), health, observability, providers, net, state,
redaction, domain and settings.
"""
