"""The gateway's own provider adapters against the emulators, over real sockets.

Proves the emulators speak what the adapters expect: a probe is free, a
generation round-trips with images of the asked size, and a fault reaches
the adapter classified as the failure it stands for.
"""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.domain.job import ImageJob, JobKind
from gateway.providers.base import AdapterSettings, FailureClass, ProviderError, Timeouts
from tests.emulators.support import ALL, stats

FAST = Timeouts(connect=1.0, request=5.0, poll_interval=0.01, max_poll_interval=0.05)


def adapter_class(name: str):
    module = pytest.importorskip(f"gateway.providers.{name}")
    classes = [c for c in vars(module).values() if isinstance(c, type) and getattr(c, "kind", None) == name and c.__module__ == module.__name__]
    if not classes:
        pytest.skip(f"no adapter for {name}")
    return classes[0]


def make_adapter(fleet, name: str, client: httpx.AsyncClient):
    emulator = fleet[name]
    settings = AdapterSettings(name=name, base_url=emulator.base_url, credential=emulator.key or None, timeouts=FAST)
    return adapter_class(name)(settings, client)


@pytest.mark.parametrize("name", ALL)
async def test_probe_is_free_and_generate_round_trips(client, fleet, name):
    adapter = make_adapter(fleet, name, client)
    probe = await adapter.probe()
    assert probe.ok, probe.detail
    assert (await stats(client, fleet, name))["generations"] == 0
    result = await adapter.generate(ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=1024, height=1024), time.monotonic() + 10)
    assert len(result.images) == 1
    image = result.images[0]
    assert image.url or image.data or image.b64
    assert (await stats(client, fleet, name))["generations"] == 1


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("fault", "failure"),
    [("rate_limited", FailureClass.REFUSED), ("server_error", FailureClass.FAILED), ("out_of_credit", FailureClass.REFUSED)],
)
async def test_faults_reach_the_adapter_as_their_failure_class(client, fleet, name, fault, failure):
    fleet[name].set_knobs({"faults": {"queue": [fault]}})
    adapter = make_adapter(fleet, name, client)
    with pytest.raises(ProviderError) as caught:
        await adapter.generate(ImageJob(kind=JobKind.GENERATE, prompt="a red fox", width=1024, height=1024), time.monotonic() + 5)
    assert caught.value.failure is failure
    if fault == "rate_limited":
        assert caught.value.retry_after == 1.0
