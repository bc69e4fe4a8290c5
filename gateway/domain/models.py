"""The model this gateway serves, its aliases, and the `backend/model` pin."""

from __future__ import annotations

from typing import Literal

MODEL_ID = "flux-2-klein-4b"
ALIASES = frozenset({MODEL_ID, "flux.2-klein-4b", "black-forest-labs/flux-2-klein-4b", "black-forest-labs/flux.2-klein-4b"})
CREATED = 1768435200  # 2026-01-15, the model's public release
OWNED_BY = "black-forest-labs"
MAX_MODEL_CHARS = 256  # longer than any alias or backend pin; longer is refused at parse
ECHO_CHARS = 64  # how much of a caller's unknown model name an error repeats


def resolve_model(model: str, backends: set[str]) -> str | Literal[False] | None:
    """None for the model itself, a backend name for `backend/model`, False if unknown.

    `black-forest-labs/...` is an alias, not a pin: it is the model's own id
    on Replicate and Runflow."""
    name = model.strip().lower()
    if name in ALIASES:
        return None
    backend, sep, rest = name.partition("/")
    if sep and backend in backends and rest in ALIASES:
        return backend
    return False


def echo(value: str) -> str:
    """A caller's string as an error message may repeat it: short, and marked when cut."""
    return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "..."


def model_object(model_id: str = MODEL_ID) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": OWNED_BY}
