"""What each backend would charge for a job, and the order to try them in. Pure policy.

May import `gateway.domain` and `gateway.health.view` (the read-only health a plan is made from).
"""
