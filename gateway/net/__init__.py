"""The gateway's own network edge: upstream transports, the address policy, pinned fetches.

May import redaction, domain and settings.
"""
