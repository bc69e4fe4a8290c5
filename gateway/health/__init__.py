"""Backend health: the tracker, breakers and their stored records, the per-process copy,
half-open trials and free probes.

May import observability, providers, net, state, redaction, domain and settings.
"""
