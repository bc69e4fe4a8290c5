"""The request as the gateway understands it: jobs, sizes, capabilities, the model, errors.

Pure data and rules. Imports nothing else of the gateway's.
"""
