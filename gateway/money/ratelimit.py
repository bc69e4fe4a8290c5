"""Per-key rate limits (requests and images per minute), shared by replicas.

Built on the `limits` library's moving window: it is maintained, its Redis
storage does the check-and-add in one Lua script (so replicas share one
window and never race), and a moving window has no burst at a fixed window's
edge (a fixed per-minute counter admits 2x the limit across a boundary).
Without `REDIS_URL` the same limiter runs in memory, per process.

The answer carries OpenAI's headers (`x-ratelimit-limit-requests`,
`-remaining-requests`, `-reset-requests`, and the `-images` equivalents);
a refusal is a 429 `rate_limit_exceeded` with `retry-after`. When Redis
cannot be reached the limiter lets the request through and logs it: a rate
limit protects capacity, and budgets (which fail closed) protect money.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter

from gateway.domain.errors import GatewayError, InvalidRequest
from gateway.money.keys import RateLimits

log = logging.getLogger("klein.ratelimit")


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable_default = True


def reset_text(seconds: float) -> str:
    """OpenAI's reset format: `950ms`, `12s`, `1m3s`."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class Verdict:
    headers: dict[str, str] = field(default_factory=dict)


class RateLimiter:
    def __init__(self, redis_url: str | None = None, *, namespace: str = "default") -> None:
        if redis_url:
            from limits.aio.storage import RedisStorage

            scheme, _, rest = redis_url.partition("://")
            storage: Storage = RedisStorage(f"async+{scheme}://{rest}", implementation="redispy", key_prefix=f"klein:{namespace}:ratelimit", socket_timeout=0.5, socket_connect_timeout=0.5)
        else:
            from limits.aio.storage import MemoryStorage

            storage = MemoryStorage()
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(storage)

    async def admit(self, key: str, rules: RateLimits, images: int) -> Verdict:
        """Count one request of `images` images for `key`, or raise RateLimited."""
        verdict = Verdict()
        checks: list[tuple[str, RateLimitItem, int]] = []
        if rules.requests_per_minute:
            checks.append(("requests", RateLimitItemPerMinute(rules.requests_per_minute), 1))
        if rules.images_per_minute:
            if images > rules.images_per_minute:
                raise InvalidRequest(f"n={images} is more than this key's images_per_minute ({rules.images_per_minute})", param="n", code="rate_limit_too_small")
            checks.append(("images", RateLimitItemPerMinute(rules.images_per_minute), images))
        for what, item, cost in checks:
            try:
                allowed = await self._limiter.hit(item, key, what, cost=cost)
                stats = await self._limiter.get_window_stats(item, key, what)
            except Exception as exc:  # noqa: BLE001 - storage errors of any driver
                log.warning("rate limit store unavailable, request admitted: %s", type(exc).__name__)
                return verdict
            reset_in = max(0.0, stats.reset_time - time.time())
            verdict.headers[f"x-ratelimit-limit-{what}"] = str(item.amount)
            verdict.headers[f"x-ratelimit-remaining-{what}"] = str(max(0, stats.remaining))
            verdict.headers[f"x-ratelimit-reset-{what}"] = reset_text(reset_in)
            if not allowed:
                err = RateLimited(
                    f"rate limit reached for {what}: {item.amount} per minute for this key; retry in {reset_text(reset_in)}",
                    retry_after=max(1.0, reset_in),
                )
                err.limit_headers = dict(verdict.headers)  # type: ignore[attr-defined]
                raise err
        return verdict

    async def close(self) -> None:
        bridge = getattr(self._storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is not None and hasattr(client, "aclose"):
            with contextlib.suppress(Exception):  # closing a dead connection is not news
                await client.aclose()
