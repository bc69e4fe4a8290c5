"""What each backend would charge for a job, and the order to try them in. Pure policy.

May import health (the read-only view a plan is made from), observability,
providers, net, state, redaction, domain and settings.
"""
