"""The request as the gateway understands it: jobs, sizes, capabilities, the model, media types, errors.

Pure data and rules. May import only `gateway.settings`.
"""
