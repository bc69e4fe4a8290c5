"""Uploaded files (OpenAI's /v1/files), the input of the Batch API for images.

A file is two things: its bytes, a blob in the image store (memory, a
directory or S3: gateway.images), and a small record in the state store
(memory, or Redis so every replica sees the same files) naming its owner,
size, purpose, expiry and blob. `Files` keeps the two together; the HTTP
routes (gateway/http/files.py) only parse and answer. `batch_input` checks a
`purpose=batch` upload line by line before it is stored.
"""

from __future__ import annotations

from gateway.files.batch_input import BATCH_URLS, check_batch_lines
from gateway.files.store import PURPOSES, FileRecord, Files, valid_file_id

__all__ = ["BATCH_URLS", "PURPOSES", "FileRecord", "Files", "check_batch_lines", "valid_file_id"]
