"""What the operator sees: Prometheus metrics, who may read them, and the request log.

May import providers (failure classes, credential variables), net, state,
redaction, domain and settings.
"""
