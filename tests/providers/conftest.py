"""Shared fixtures for provider adapter tests: jobs, an HTTP client, a deadline.

Adapters are exercised against respx mocks of each provider's documented wire
shapes; nothing here touches the network.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import respx

from gateway.domain.job import ImageJob, JobKind, ReferenceImage
from gateway.providers.base import AdapterSettings, Timeouts

# The smallest valid PNG header is enough: adapters pass bytes through, they never decode them.
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24

FAST_TIMEOUTS = Timeouts(connect=1.0, request=2.0, poll_interval=0.001, max_poll_interval=0.005)


@pytest.fixture
def make_job() -> Callable[..., ImageJob]:
    """An ImageJob factory: text-to-image at 1024x1024 unless told otherwise.

    `kind=JobKind.EDIT` without `references` gets one uploaded PNG reference.
    """

    def factory(**overrides: Any) -> ImageJob:
        fields: dict[str, Any] = {"kind": JobKind.GENERATE, "prompt": "a red fox in the snow", "width": 1024, "height": 1024}
        fields.update(overrides)
        if fields["kind"] is JobKind.EDIT and not fields.get("references"):
            fields["references"] = (ReferenceImage(content_type="image/png", data=PNG_BYTES, width=64, height=64),)
        return ImageJob(**fields)

    return factory


@pytest.fixture
def make_settings() -> Callable[..., AdapterSettings]:
    """AdapterSettings with fast poll intervals; pass name, base_url, credential, options."""

    def factory(name: str, base_url: str, credential: str | None, **options: Any) -> AdapterSettings:
        return AdapterSettings(name=name, base_url=base_url, credential=credential, timeouts=FAST_TIMEOUTS, options=options)

    return factory


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def deadline() -> float:
    """A monotonic deadline a few seconds out: generous for tests, never reached by a passing one."""
    return time.monotonic() + 5.0


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    """A respx router for one test: an unmocked request fails it, an unused route does not."""
    with respx.mock(assert_all_called=False) as router:
        yield router
