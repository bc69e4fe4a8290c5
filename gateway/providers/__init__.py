"""Provider adapters, registered by kind.

A provider is one `Adapter` subclass that carries its own metadata (kind,
credential and base-URL variables, options dataclass, capabilities, probe,
emulator hook), one price sheet and one providers.yaml entry. Config, logs,
health, routing and the emulator launcher ask this registry; none names a
provider. An adapter gets here in one of three ways:

- a module in this package decorated with `@register` (every such module is
  imported on the first lookup);
- an installed distribution's entry point in the group `klein_gateway.providers`
  (`acme = "acme_klein.adapter:AcmeAdapter"`), as plugins register with
  simonw/llm: loading the class, or the module that registers it, is enough;
- a program calling `register(cls)` itself before it loads the config.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from gateway.domain.capabilities import Capabilities
from gateway.domain.job import JobKind
from gateway.providers.base import Adapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "adapter_class",
    "capabilities_for",
    "credential_env_names",
    "kinds",
    "register",
    "unregister",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "klein_gateway.providers"
_SUPPORT_MODULES = frozenset({"base", "options"})  # modules here that define no provider

A = TypeVar("A", bound=type[Adapter])

_registry: dict[str, type[Adapter]] = {}
_discovered = False  # every built-in module and entry point has been loaded
_discovering = False  # this thread is loading them (a plugin may look a kind up as it loads)
_discovery_lock = threading.RLock()  # apps built in parallel threads wait for one discovery


def register(cls: A) -> A:
    """Add an adapter class under its `kind` (usable as a class decorator).

    Registering the same class again is a no-op; another class under a kind
    already taken is refused, so two plugins cannot silently shadow each other."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{cls.__qualname__}: `kind` must be letters, digits, '-' or '_', not {kind!r}")
    for attr in ("base_url_env", "default_capabilities"):
        if not hasattr(cls, attr):
            raise ValueError(f"{cls.__qualname__}: an adapter must set `{attr}`")
    if not isinstance(cls.default_capabilities, Capabilities):
        raise TypeError(f"{cls.__qualname__}: `default_capabilities` must be a Capabilities")
    current = _registry.get(kind)
    if current is not None and current is not cls:
        raise ValueError(f"provider kind {kind!r} is already registered by {current.__module__}.{current.__qualname__}")
    _registry[kind] = cls
    return cls


def unregister(kind: str) -> None:
    """Remove a kind (a test's throwaway adapter, say); unknown kinds are ignored."""
    _registry.pop(kind, None)


def _discover() -> None:
    """Import this package's adapter modules, then the entry points, once."""
    global _discovered, _discovering
    if _discovered:
        return
    with _discovery_lock:
        if _discovered or _discovering:
            return
        _discovering = True
        try:
            for module in pkgutil.iter_modules(__path__):
                if not module.name.startswith("_") and module.name not in _SUPPORT_MODULES:
                    importlib.import_module(f"{__name__}.{module.name}")
            for entry in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    loaded = entry.load()
                except Exception:  # a broken plugin must not take the built-in providers down with it
                    log.exception("could not load provider plugin %s (%s)", entry.name, entry.value)
                    continue
                if isinstance(loaded, type) and issubclass(loaded, Adapter):
                    register(loaded)
            _discovered = True
        finally:
            _discovering = False


def kinds() -> tuple[str, ...]:
    """Every registered kind, sorted."""
    _discover()
    return tuple(sorted(_registry))


def adapter_class(kind: str) -> type[Adapter]:
    """The adapter class registered under `kind`; LookupError names the known kinds."""
    _discover()
    try:
        return _registry[kind]
    except KeyError:
        raise LookupError(f"unknown provider kind {kind!r}; known: {', '.join(kinds())}") from None


def credential_env_names() -> tuple[str, ...]:
    """The default credential variable of every registered provider."""
    _discover()
    return tuple(sorted({cls.credential_env for cls in _registry.values() if cls.credential_env}))


def capabilities_for(kind: str, options: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None, job_kind: JobKind = JobKind.GENERATE) -> Capabilities:
    """A backend's capabilities for one kind of job: the adapter's (option-aware)
    defaults, then providers.yaml overrides, then what the wire fixes (a
    provider that takes reference bytes never takes the caller's URLs)."""
    cls = adapter_class(kind)
    caps = cls.capabilities_for(options, job_kind).merged(dict(overrides or {}))
    if cls.takes_reference_bytes and caps.accepts_url_refs:
        caps = caps.merged({"accepts_url_refs": False})
    return caps
