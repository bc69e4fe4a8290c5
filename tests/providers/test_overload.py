"""A connect timeout that fires long after it was due is the gateway's overload, not the backend's sickness."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.health.tracker import NO_EFFECT, health_effect
from gateway.providers.base import GATEWAY_OVERLOADED, AdapterSettings, FailureClass, ProviderError, Timeouts
from gateway.providers.fal import FalAdapter


def adapter_with(handler) -> FalAdapter:
    settings = AdapterSettings(name="fal", base_url="http://fal.test", credential="k", timeouts=Timeouts(connect=0.01, request=5))
    return FalAdapter(settings, httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("stall_s,expected_code", [(0.0, None), (1.2, GATEWAY_OVERLOADED)], ids=["on_time", "fired_late"])
async def test_connect_timeout_is_blamed_on_the_gateway_only_when_it_fired_late(stall_s, expected_code):
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(stall_s)  # a saturated event loop delays the timer like this
        raise httpx.ConnectTimeout("timed out", request=request)

    adapter = adapter_with(handler)
    with pytest.raises(ProviderError) as exc:
        await adapter.request("GET", "http://fal.test/x", deadline=time.monotonic() + 10)
    assert exc.value.failure is FailureClass.UNREACHABLE
    assert exc.value.code == expected_code


def test_overload_has_no_effect_on_the_backends_health():
    err = ProviderError(FailureClass.UNREACHABLE, "the gateway was too busy", code=GATEWAY_OVERLOADED)
    assert health_effect(err) == NO_EFFECT
    assert health_effect(ProviderError(FailureClass.UNREACHABLE, "refused")).counts_as_failure
