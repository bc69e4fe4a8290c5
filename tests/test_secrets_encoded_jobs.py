"""An encoded key in a provider's error reaches neither a job record nor its webhook.

A job fails on a provider that quotes its key base64-, hex- or otherwise
encoded; the job record's error and the signed webhook body carry the
gateway's words (class and status), never the provider's text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.observability.metrics import GatewayMetrics
from tests.gateway_support import ServerThread
from tests.jobs_support import PRICING, WebhookReceiver, config_with, new_webhook_secret, wait_job
from tests.test_secrets import CALLER_KEY, ENV, KEYS, hostile_router
from tests.test_secrets_encoded import ENCODINGS, _leaks

SECRET = KEYS["REPLICATE_API_TOKEN"]
STATUS = 422


class Provider:
    """Which spelling of the key the fake provider quotes next."""

    encoding = "base64"

    def body(self) -> str:
        spelled = ENCODINGS[self.encoding](SECRET)
        return json.dumps({"detail": f"bad credential {spelled}"})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Provider]]:
    provider = Provider()

    async def handler(request: httpx.Request) -> httpx.Response:
        return await hostile_router("replicate", STATUS, provider.body()).async_handler(request)

    config = config_with(tmp_path_factory.mktemp("jobs"), webhook_allow=["127.0.0.1"], webhook_retry_delays_s=[0.05])
    env = {**ENV, "KLEIN_WEBHOOK_SECRET": new_webhook_secret()}
    app = create_app(config, PRICING, env=env, transport=httpx.MockTransport(handler), probes=False, metrics=GatewayMetrics(registry=CollectorRegistry()))
    with ServerThread(app) as server:
        yield server.url, provider


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_failed_jobs_record_and_webhook_hold_the_gateways_words_only(served, encoding):
    url, provider = served
    provider.encoding = encoding
    headers = {"Authorization": f"Bearer {CALLER_KEY}", "Prefer": "respond-async"}
    body = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "provider": {"only": ["replicate"]}}
    with httpx.Client(timeout=30) as http, WebhookReceiver() as receiver:
        job = http.post(f"{url}/v1/images/generations", json={**body, "webhook_url": receiver.url}, headers=headers).json()
        done = wait_job(http, url, job["id"], headers={"Authorization": f"Bearer {CALLER_KEY}"})
        (delivery,) = receiver.wait_for(1)
    record = json.dumps(done)
    assert done["status"] == "failed" and done["error"]["message"], done
    assert "bad credential" not in record and not _leaks(record, SECRET, encoding)
    hook = delivery.body.decode()
    assert json.loads(hook)["error"]["message"] == done["error"]["message"]
    assert "bad credential" not in hook and not _leaks(hook, SECRET, encoding)
