"""Provider adapters: one module per provider, registered here by kind.

Adding a provider is one module that subclasses `Adapter` and one line in
`ADAPTER_MODULES`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from gateway.capabilities import Capabilities
from gateway.job import JobKind
from gateway.providers.base import Adapter

ADAPTER_MODULES = {
    "fal": "gateway.providers.fal",
    "replicate": "gateway.providers.replicate",
    "runflow": "gateway.providers.runflow",
    "empiriolabs": "gateway.providers.empiriolabs",
    "local": "gateway.providers.local",
}


def adapter_class(kind: str) -> type[Adapter]:
    """The Adapter subclass whose `kind` matches, from its registered module."""
    module = importlib.import_module(ADAPTER_MODULES[kind])
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Adapter) and value is not Adapter and getattr(value, "kind", None) == kind:
            return value
    raise LookupError(f"module {ADAPTER_MODULES[kind]} defines no adapter of kind {kind!r}")


def capabilities_for(kind: str, options: dict[str, Any], overrides: dict[str, Any], job_kind: JobKind = JobKind.GENERATE) -> Capabilities:
    """A backend's capabilities for one kind of job: the adapter's (option-aware)
    defaults, then providers.yaml overrides. Some providers serve edits from a
    narrower endpoint (Runflow), so the adapter may answer per job kind."""
    cls = adapter_class(kind)
    derive = getattr(cls, "capabilities_for", None)
    if derive is None:
        base = cls.default_capabilities
    elif "kind" in inspect.signature(derive).parameters:
        base = derive(options, kind=job_kind)
    else:
        base = derive(options)
    return base.merged(overrides)
