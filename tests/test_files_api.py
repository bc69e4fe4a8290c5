"""/v1/files: OpenAI's Files API, the first step of the Batch API for images.

The official openai SDK, unchanged, uploads, reads, downloads, lists and
deletes a batch file against the gateway served by uvicorn; files belong to
the key that uploaded them; a malformed batch line is refused by number; the
size limit answers 413 in OpenAI's envelope; the filesystem and S3 stores keep
the bytes; and two gateways on one Redis and one shared directory see the
same file.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.gateway_support import ENV, PROVIDERS_YAML, ServerThread, make_app
from tests.redis_server import redis_available
from tests.s3_server import S3Endpoint

KEY_A, KEY_B = "sk-files-key-a-0000", "sk-files-key-b-0000"
KEYED = {**ENV, "KLEIN_GATEWAY_KEYS": f"{KEY_A},{KEY_B}"}


def batch_lines(n: int = 3, *, url: str = "/v1/images/generations") -> bytes:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": url, "body": {"prompt": f"a lighthouse, take {i}", "size": "512x512"}} for i in range(n)]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture
def gateway() -> Iterator[str]:
    with ServerThread(make_app(KEYED)) as server:
        yield server.url


def sdk(url: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_the_official_sdk_uploads_reads_downloads_lists_and_deletes_a_batch_file(gateway: str, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    data = batch_lines(3) + b"\n"  # a trailing blank line is fine
    path.write_bytes(data)
    client = sdk(gateway)
    with path.open("rb") as f:
        created = client.files.create(file=f, purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (len(data), "requests.jsonl", "batch", "processed")
    assert created.expires_at == created.created_at + 30 * 86400  # OpenAI keeps batch files 30 days by default

    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).read() == data  # byte for byte

    other = client.files.create(file=("images.bin", b"\x89PNG opaque bytes"), purpose="user_data", expires_after={"anchor": "created_at", "seconds": 3600})
    assert other.expires_at == other.created_at + 3600 and other.purpose == "user_data"
    listed = client.files.list()
    assert {f.id for f in listed.data} == {created.id, other.id}
    assert [f.id for f in client.files.list(purpose="batch")] == [created.id]
    ascending = [f.id for f in client.files.list(order="asc")]
    assert ascending == sorted(ascending, key=lambda i: (client.files.retrieve(i).created_at, i))
    paged = [f.id for f in client.files.list(limit=1, order="asc")]  # the SDK follows `after` page by page
    assert paged == ascending

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    assert [f.id for f in client.files.list()] == [other.id]


def test_a_file_belongs_to_the_key_that_uploaded_it(gateway: str) -> None:
    mine = sdk(gateway, KEY_A).files.create(file=("a.jsonl", batch_lines(1)), purpose="batch")
    theirs = sdk(gateway, KEY_B)
    missing = "file-" + "0" * 24
    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as seen:
            call(mine.id)
        with pytest.raises(openai.NotFoundError) as absent:
            call(missing)
        assert seen.value.body["message"].replace(mine.id, "X") == absent.value.body["message"].replace(missing, "X")  # nothing tells them apart
    assert list(theirs.files.list()) == []
    assert sdk(gateway, KEY_A).files.retrieve(mine.id).id == mine.id  # still there for its owner
    assert httpx.get(f"{gateway}/v1/files").status_code == 401


@pytest.mark.parametrize(
    ("content", "line", "why"),
    [
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {}}\n{not json\n', 2, "not valid JSON"),
        (b'\n{"method": "POST", "url": "/v1/images/generations", "body": {}}\n', 2, "custom_id is missing"),
        (batch_lines(2) + b'{"custom_id": "req-0", "method": "POST", "url": "/v1/images/edits", "body": {}}\n', 3, "custom_id 'req-0' is also on line 1"),
        (batch_lines(1, url="/v1/chat/completions"), 1, "url '/v1/chat/completions' is not supported"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/images/generations", "body": {}}\n', 1, "method must be POST"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": "draw"}\n', 1, "body must be a JSON object"),
    ],
)
def test_a_malformed_batch_line_is_refused_by_number_and_reason(gateway: str, content: bytes, line: int, why: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(gateway).files.create(file=("bad.jsonl", content), purpose="batch")
    error = refused.value.body
    assert error["message"].startswith(f"line {line}: ") and why in error["message"]
    assert (error["code"], error["param"], error["line"]) == ("invalid_batch_file", "file", line)
    assert list(sdk(gateway).files.list()) == []  # nothing was stored


def test_purposes_other_than_batch_vision_and_user_data_are_refused(gateway: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(gateway).files.create(file=("train.jsonl", b"{}\n"), purpose="fine-tune")
    assert refused.value.body["code"] == "unsupported_purpose"
    response = httpx.post(f"{gateway}/v1/files", headers={"authorization": f"Bearer {KEY_A}"}, files={"file": ("x", b"")}, data={"purpose": "user_data"})
    assert (response.status_code, response.json()["error"]["code"]) == (400, "empty_file")


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"json": {"purpose": "batch"}}, 400, "invalid_content_type"),
        ({"files": {"file": ("a.jsonl", b"x")}}, 400, "missing_required_parameter"),
        ({"data": {"purpose": "batch"}, "files": {"other": ("a.jsonl", b"x")}}, 400, "missing_required_parameter"),
        ({"data": {"purpose": "batch", "file": "not a file part"}, "files": {"other": ("a", b"x")}}, 400, "missing_required_parameter"),
        ({"files": {"file": ("a.bin", b"x"), "purpose": ("p", b"batch")}}, 400, "unsupported_purpose"),
        ({"data": {"purpose": "user_data", "expires_after[anchor]": "now", "expires_after[seconds]": "3600"}, "files": {"file": ("a", b"x")}}, 400, "invalid_value"),
        ({"data": {"purpose": "user_data", "expires_after[anchor]": "created_at", "expires_after[seconds]": "59"}, "files": {"file": ("a", b"x")}}, 400, "invalid_value"),
        ({"data": {"purpose": "user_data", "expires_after[anchor]": "created_at", "expires_after[seconds]": "²"}, "files": {"file": ("a", b"x")}}, 400, "invalid_value"),
        ({"data": {"purpose": "user_data", "expires_after[anchor]": "created_at", "expires_after[seconds]": "99999999"}, "files": {"file": ("a", b"x")}}, 400, "invalid_value"),
    ],
)
def test_a_malformed_upload_is_a_400_in_the_envelope(gateway: str, request_kwargs: dict[str, Any], status: int, code: str) -> None:
    response = httpx.post(f"{gateway}/v1/files", headers={"authorization": f"Bearer {KEY_A}"}, **request_kwargs)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert response.headers["x-should-retry"] == "false" and response.headers["x-request-id"]


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "limit=²", "limit=x", "order=sideways", f"after=file-{'0' * 24}"])
def test_a_malformed_list_query_is_a_400(gateway: str, query: str) -> None:
    response = httpx.get(f"{gateway}/v1/files?{query}", headers={"authorization": f"Bearer {KEY_A}"})
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_value"), response.text


def test_ids_that_no_upload_could_have_made_are_404_without_a_lookup(gateway: str) -> None:
    for file_id in ("file-../../etc", "x" * 300, "file-ABC", "%00"):
        response = httpx.get(f"{gateway}/v1/files/{file_id}/content", headers={"authorization": f"Bearer {KEY_A}"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "file_not_found"


def test_a_batch_file_may_start_with_a_byte_order_mark_and_use_crlf(gateway: str) -> None:
    data = b"\xef\xbb\xbf" + batch_lines(2).replace(b"\n", b"\r\n")
    created = sdk(gateway).files.create(file=("windows.jsonl", data), purpose="batch")
    assert sdk(gateway).files.content(created.id).read() == data  # kept as sent, only the check reads past the mark


def small_limit_config(tmp_path: Path, max_file_bytes: int, max_body_bytes: int) -> Path:
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["gateway"].update(max_file_bytes=max_file_bytes, max_body_bytes=max_body_bytes)
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "pricing").symlink_to(PROVIDERS_YAML.parent / "pricing")
    return path


def test_a_file_over_the_size_limit_is_refused_413_in_the_openai_envelope(tmp_path: Path) -> None:
    limit = 200_000
    with ServerThread(make_app(KEYED, config=small_limit_config(tmp_path, limit, max_body_bytes=limit // 2))) as server:
        client = sdk(server.url)
        exactly = b"x" * limit
        assert client.files.create(file=("max.bin", exactly), purpose="user_data").bytes == limit
        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=("big.bin", exactly + b"x"), purpose="user_data")
        assert refused.value.status_code == 413
        assert refused.value.body["code"] == "file_too_large" and f"{limit:,} bytes" in refused.value.body["message"]
        # Far over it: refused on the announced length, before the body is read.
        huge = httpx.post(f"{server.url}/v1/files", headers={"authorization": f"Bearer {KEY_A}"}, files={"file": ("huge.bin", b"y" * (limit * 5))}, data={"purpose": "user_data"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "file_too_large"
        # Chunked, with no Content-Length to refuse early: cut off once the bytes pass the limit.
        boundary = "klein-boundary"
        head = f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="s.bin"\r\n\r\n'.encode()

        def chunks() -> Iterator[bytes]:
            yield head
            for _ in range(limit // 10_000 + 10):
                yield b"z" * 10_000
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = httpx.post(f"{server.url}/v1/files", headers={"authorization": f"Bearer {KEY_A}", "content-type": f"multipart/form-data; boundary={boundary}"}, content=chunks())
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "file_too_large"
        # The file at the limit was over the app's general body limit (max_body_bytes): uploads answer to max_file_bytes only.
        assert [f.bytes for f in client.files.list()] == [limit]
        too_big_elsewhere = httpx.post(f"{server.url}/v1/images/generations", headers={"authorization": f"Bearer {KEY_A}"}, content=b"x" * limit)
        assert too_big_elsewhere.status_code == 413


def test_the_filesystem_store_keeps_the_bytes(tmp_path: Path) -> None:
    env = {**KEYED, "KLEIN_IMAGE_STORE": "filesystem", "KLEIN_IMAGE_DIR": str(tmp_path / "store")}
    data = batch_lines(5)
    with ServerThread(make_app(env)) as server:
        created = sdk(server.url).files.create(file=("in.jsonl", data), purpose="batch")
    blobs = list((tmp_path / "store" / "blobs").iterdir())
    assert [b.read_bytes() for b in blobs] == [data]
    with ServerThread(make_app(env)) as server:  # without REDIS_URL the record was in that process's memory: a new one knows no such file
        with pytest.raises(openai.NotFoundError):
            sdk(server.url).files.content(created.id)


def test_the_s3_store_keeps_the_bytes(s3_bucket: S3Endpoint) -> None:
    import boto3

    env = {**KEYED, **s3_bucket.env(KLEIN_URL_SIGNING_KEY="s" * 32)}
    data = batch_lines(4)
    with ServerThread(make_app(env)) as server:
        client = sdk(server.url)
        created = client.files.create(file=("in.jsonl", data), purpose="batch")
        assert client.files.content(created.id).read() == data
        s3 = boto3.client("s3", endpoint_url=s3_bucket.url, aws_access_key_id="klein-test-access", aws_secret_access_key="klein-test-secret", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket.bucket).get("Contents", [])]
        assert len(keys) == 1 and keys[0].startswith("klein/images/blobs/")
        assert s3.get_object(Bucket=s3_bucket.bucket, Key=keys[0])["Body"].read() == data
        client.files.delete(created.id)
        assert s3.list_objects_v2(Bucket=s3_bucket.bucket).get("KeyCount") == 0


async def test_uploads_racing_for_one_key_all_land_in_its_list(state_store: Any) -> None:
    from gateway.config import GatewaySettings
    from gateway.files import Files
    from gateway.images import UrlSigner
    from gateway.images.memory import MemoryImageStore

    files = Files(state_store, MemoryImageStore(ttl_s=60, max_bytes=10_000, signer=UrlSigner(b"k" * 32)), GatewaySettings())
    made = await asyncio.gather(*(files.create("key-a", filename=f"{i}.jsonl", purpose="batch", data=batch_lines(1)) for i in range(20)))
    listed, more = await files.list("key-a", order="asc")
    assert {r.id for r in listed} == {r.id for r in made} and not more
    assert await files.list("key-b") == ([], False)
    assert await files.delete("key-b", made[0].id) is False and await files.delete("key-a", made[0].id) is True
    assert len((await files.list("key-a"))[0]) == 19


async def test_an_upload_while_the_shared_store_is_unreachable_is_a_503_that_leaves_no_bytes_behind() -> None:
    from gateway.config import GatewaySettings
    from gateway.files import Files
    from gateway.files.store import FileStoreUnavailable
    from gateway.images import UrlSigner
    from gateway.images.memory import MemoryImageStore
    from gateway.state import ResilientStore
    from gateway.state.redis import RedisStore
    from tests.gateway_support import free_port

    state = ResilientStore(RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", namespace="files-down"))
    blobs = MemoryImageStore(ttl_s=60, max_bytes=10_000, signer=UrlSigner(b"k" * 32))
    files = Files(state, blobs, GatewaySettings())
    with pytest.raises(FileStoreUnavailable) as refused:
        await files.create("key-a", filename="a.jsonl", purpose="batch", data=batch_lines(1))
    assert (refused.value.status, refused.value.retryable) == (503, True)
    assert blobs._blobs == {}  # the blob written first was taken back
    await state.close()


@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
def test_two_gateways_on_one_redis_and_one_directory_see_the_same_file(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    redis = request.getfixturevalue("redis_server")
    env = {**KEYED, "REDIS_URL": redis.url, "KLEIN_STATE_NAMESPACE": f"files-{tmp_path.name}"[:60], "KLEIN_IMAGE_STORE": "filesystem", "KLEIN_IMAGE_DIR": str(tmp_path / "shared")}
    data = batch_lines(2)
    with ServerThread(make_app(env)) as one, ServerThread(make_app(env)) as two:
        created = sdk(one.url).files.create(file=("in.jsonl", data), purpose="batch")
        other = sdk(two.url)
        assert other.files.retrieve(created.id) == created
        assert other.files.content(created.id).read() == data
        assert [f.id for f in other.files.list()] == [created.id]
        second = other.files.create(file=("more.jsonl", data), purpose="batch")
        assert {f.id for f in sdk(one.url).files.list()} == {created.id, second.id}
        sdk(two.url, KEY_B).files.list()  # the other key sees nothing, on either replica
        assert list(sdk(one.url, KEY_B).files.list()) == []
        other.files.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            sdk(one.url).files.retrieve(created.id)
