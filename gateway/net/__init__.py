"""The gateway's own network edge: upstream transports, address policy, pinned fetches.

Imports nothing else of the gateway's but `gateway.net` itself.
"""
