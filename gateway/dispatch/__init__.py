"""Running a plan: the fleet of backends in service, attempts and failover, delivery of the
images, reference inputs, upload links, overload and the graceful drain.

May import images, config, money, routing, health, observability, providers, net,
state, redaction, domain and settings; never jobs, service or http.
"""
