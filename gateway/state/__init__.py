"""Where shared state lives: memory by default, Redis when `REDIS_URL` is set.

`open_store()` is what the app calls; with a URL it returns a
`ResilientStore` over Redis with memory as the fallback, so a Redis outage
degrades the gateway (status "degraded") instead of failing requests.
"""

from __future__ import annotations

from gateway.settings import Settings
from gateway.state.base import StateStore, StoreStatus
from gateway.state.memory import MemoryStore
from gateway.state.resilient import Merge, ResilientStore, set_if_absent

__all__ = ["MemoryStore", "Merge", "ResilientStore", "StateStore", "StoreStatus", "open_store"]


def open_store(url: str | None = None, *, namespace: str | None = None, merge: Merge = set_if_absent) -> StateStore:
    """The configured store. `url` defaults to `REDIS_URL`; the namespace to
    `KLEIN_STATE_NAMESPACE` or "default" (keys are `klein:<namespace>:...`).
    `merge` decides what a replica writes back after an outage (see ResilientStore)."""
    env = Settings.from_env()
    url = url if url is not None else env.redis_url
    if not url:
        return MemoryStore()
    from gateway.state.redis import RedisStore  # redis is only imported when used

    ns = namespace or env.state_namespace or "default"
    return ResilientStore(RedisStore.from_url(url, namespace=ns), MemoryStore(), merge=merge)
