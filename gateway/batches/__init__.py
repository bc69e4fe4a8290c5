"""OpenAI's Batch API for images: batch records, the scheduler, and the driver that runs lines as jobs."""

from __future__ import annotations
