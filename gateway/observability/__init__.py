"""What the operator sees: Prometheus metrics, who may read them, and the request log.

May import `gateway.domain` only: secrets are masked here for every layer above.
"""
