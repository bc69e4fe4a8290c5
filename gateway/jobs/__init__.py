"""Async image jobs: records, the queue, the worker, webhooks.

The worker runs jobs through `pipeline.Pipeline`, never the assembled Gateway; may
import dispatch and everything below it.
"""
