"""A real S3-compatible HTTP server on loopback for the s3 image store: moto's
standalone server (ThreadedMotoServer), started by the test suite, one bucket
per test so tests never see each other's objects."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "klein-test-access", "AWS_SECRET_ACCESS_KEY": "klein-test-secret", "AWS_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str

    def env(self, **extra: str) -> dict[str, str]:
        """What a gateway needs to use this bucket as its image store."""
        return {**CREDENTIALS, "KLEIN_IMAGE_STORE": "s3", "KLEIN_S3_ENDPOINT": self.url, "KLEIN_S3_BUCKET": self.bucket, **extra}


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_url: str) -> S3Endpoint:
    import boto3

    bucket = "klein-" + secrets.token_hex(6)
    client = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return S3Endpoint(moto_url, bucket)
