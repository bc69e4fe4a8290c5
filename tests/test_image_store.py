"""The image store: one interface, three stores (memory, filesystem, s3 on a
real loopback S3 server), the signed URLs in front of them, the blobs beside
the images (uploaded files), and the choice of store and key at start-up."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.config import GatewaySettings, ImageStoreSettings
from gateway.images import ImageStore, ImageStoreError, UrlSigner, open_image_store, valid_name
from gateway.images.base import new_blob_name, new_name, valid_blob_name
from gateway.images.filesystem import FilesystemImageStore, shared_signing_key
from gateway.images.memory import MemoryImageStore
from gateway.images.s3 import S3ImageStore, open_bucket
from tests.gateway_support import png_bytes
from tests.s3_server import CREDENTIALS, S3Endpoint

TTL_S = 60
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[[Clock, int], ImageStore]


@pytest.fixture(params=["memory", "filesystem", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Each store, built with a test clock and a byte cap."""
    kind = request.param
    signer = UrlSigner(b"k" * 32)
    if kind == "memory":
        return lambda clock, cap: MemoryImageStore(ttl_s=TTL_S, max_bytes=cap, signer=signer, clock=clock)
    if kind == "filesystem":
        return lambda clock, cap: FilesystemImageStore(tmp_path / "images", ttl_s=TTL_S, max_bytes=cap, signer=signer, clock=clock)
    s3: S3Endpoint = request.getfixturevalue("s3_bucket")
    bucket = open_bucket(s3.bucket, endpoint_url=s3.url, region="us-east-1", env=CREDENTIALS)
    return lambda clock, cap: S3ImageStore(bucket, prefix="t/", ttl_s=TTL_S, max_bytes=cap, signer=signer, clock=clock)


async def test_put_then_get_returns_the_same_bytes_and_type(make_store: StoreFactory) -> None:
    store = make_store(Clock(), 10_000_000)
    data = png_bytes(64, 48)
    ref = await store.put(data, "image/png")
    got = await store.get(ref.name)
    assert got is not None
    assert (got.data, got.content_type, got.expires_at) == (data, "image/png", int(NOW) + TTL_S)
    assert ref.name.endswith(".png") and valid_name(ref.name)


async def test_an_image_is_gone_once_its_ttl_passes(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(clock, 10_000_000)
    ref = await store.put(png_bytes(32, 32), "image/png")
    clock.now += TTL_S - 1
    assert await store.get(ref.name) is not None
    clock.now += 2
    assert await store.get(ref.name) is None


async def test_the_size_cap_evicts_the_oldest_and_keeps_the_newest(make_store: StoreFactory) -> None:
    clock = Clock()
    images = [png_bytes(96, 96, color=(i * 40, 10, 10)) for i in range(5)]
    cap = sum(len(d) for d in images[-2:]) + 10  # room for the last two only
    store = make_store(clock, cap)
    refs = []
    for data in images:
        refs.append(await store.put(data, "image/png"))
        clock.now += 1  # distinct ages
    await store.idle()  # shared stores sweep in the background, never in the caller's time
    present = [await store.get(r.name) is not None for r in refs]
    assert present[-2:] == [True, True]
    assert present[:3] == [False, False, False]


async def test_an_unknown_or_malformed_name_is_none(make_store: StoreFactory) -> None:
    store = make_store(Clock(), 10_000_000)
    for name in (new_name("image/png", 1_900_000_000), "../../etc/passwd", "x.png", ".signing-key", "1900000000-" + "A" * 22 + ".gif", "1900000000-" + "A" * 22 + ".png/../x"):
        assert await store.get(name) is None


# ---- signing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "valid"),
    [
        (lambda n, e, s: (n, e, s), True),
        (lambda n, e, s: (n, e + 1, s), False),  # a later expiry
        (lambda n, e, s: (new_name("image/png", 1_900_000_000), e, s), False),  # another image
        (lambda n, e, s: (n, e, s[:-1] + ("0" if s[-1] != "0" else "1")), False),
        (lambda n, e, s: (n, e, s.upper()), False),
        (lambda n, e, s: (n, e, ""), False),
        (lambda n, e, s: (n, e, "é" * 32), False),  # not ASCII: wrong, not an error
    ],
    ids=["as-signed", "expiry-changed", "name-changed", "sig-changed", "sig-case", "sig-empty", "sig-non-ascii"],
)
def test_only_the_signed_name_and_expiry_verify(change: Callable[[str, int, str], tuple[str, int, str]], valid: bool) -> None:
    signer = UrlSigner(b"s" * 32)
    name, expires = new_name("image/webp", 1_900_000_000), 1_900_000_000
    assert signer.verify(*change(name, expires, signer.signature(name, expires))) is valid


def test_signers_agree_only_when_they_share_a_key() -> None:
    name, expires = new_name("image/png", 1_900_000_000), 1_900_000_000
    sig = UrlSigner(b"a" * 32).signature(name, expires)
    assert UrlSigner(b"a" * 32).verify(name, expires, sig)
    assert not UrlSigner(b"b" * 32).verify(name, expires, sig)
    assert not UrlSigner().verify(name, expires, sig)  # a random key


# ---- the filesystem store across processes ----------------------------------------


def test_processes_sharing_a_directory_share_one_signing_key(tmp_path: Path) -> None:
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(shared_signing_key(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / ".signing-key").st_mode) == 0o600
    assert shared_signing_key(tmp_path) == keys[0]  # a restart reads the same key


async def test_a_reader_never_sees_a_half_written_image(tmp_path: Path) -> None:
    """Two stores on one directory (two workers): every read is whole, while the other writes."""
    signer = UrlSigner(b"k" * 32)
    writer = FilesystemImageStore(tmp_path, ttl_s=TTL_S, max_bytes=1 << 30, signer=signer)
    reader = FilesystemImageStore(tmp_path, ttl_s=TTL_S, max_bytes=1 << 30, signer=signer)
    big = os.urandom(4 << 20)
    names: list[str] = []

    async def write() -> None:
        for _ in range(12):
            names.append((await writer.put(big, "image/png")).name)

    async def read() -> list[int]:
        sizes = []
        while len(names) < 12:
            for name in names:
                got = await reader.get(name)
                assert got is not None
                sizes.append(len(got.data))
            await asyncio.sleep(0)
        return sizes

    _, sizes = await asyncio.gather(write(), read())
    assert sizes and set(sizes) == {len(big)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


async def test_a_sweep_in_one_process_removes_what_another_wrote_once_expired(tmp_path: Path) -> None:
    clock = Clock()
    signer = UrlSigner(b"k" * 32)
    a = FilesystemImageStore(tmp_path, ttl_s=TTL_S, max_bytes=1 << 30, signer=signer, clock=clock, sweep_every_s=1e9)
    b = FilesystemImageStore(tmp_path, ttl_s=TTL_S, max_bytes=1 << 30, signer=signer, clock=clock)
    old = await a.put(png_bytes(16, 16), "image/png")
    clock.now += TTL_S + 1
    fresh = await a.put(png_bytes(16, 16), "image/png")
    assert await b.sweep() == 1
    assert not (tmp_path / old.name).exists() and await b.get(fresh.name) is not None


# ---- the s3 store's own URLs -----------------------------------------------------


async def test_presigned_urls_fetch_from_the_bucket_for_the_images_lifetime(s3_bucket: S3Endpoint) -> None:
    clock = Clock(time.time())
    bucket = open_bucket(s3_bucket.bucket, endpoint_url=s3_bucket.url, region="us-east-1", env=CREDENTIALS)
    store = S3ImageStore(bucket, prefix="p/", url_mode="presigned", ttl_s=TTL_S, max_bytes=1 << 30, signer=UrlSigner(), clock=clock)
    data = png_bytes(40, 40)
    ref = await store.put(data, "image/png")
    url = await store.url(ref, "http://gateway.invalid")
    parts = urlsplit(url)
    assert url.startswith(s3_bucket.url + f"/{s3_bucket.bucket}/p/{ref.name}?")
    assert parse_qs(parts.query)["X-Amz-Expires"] == [str(TTL_S)]
    async with httpx.AsyncClient() as client:
        got = await client.get(url)
        assert (got.status_code, got.content, got.headers["content-type"]) == (200, data, "image/png")
        clock.now += TTL_S + 1  # the store's own check ends it; the sweep deletes the object
        assert await store.sweep() == 1
        assert (await client.get(url)).status_code == 404


# ---- choosing the store at start-up -------------------------------------------------


def settings(**image_store: object) -> GatewaySettings:
    return GatewaySettings(image_store=ImageStoreSettings.model_validate(image_store))


@pytest.mark.parametrize(
    ("cfg", "env", "workers", "kind"),
    [
        ({}, {}, 1, "memory"),
        ({}, {"KLEIN_IMAGE_DIR": "{tmp}"}, 4, "filesystem"),
        ({"kind": "filesystem", "path": "{tmp}"}, {}, 1, "filesystem"),
        ({"kind": "memory"}, {"KLEIN_IMAGE_STORE": "filesystem", "KLEIN_IMAGE_DIR": "{tmp}"}, 2, "filesystem"),
        ({}, {"KLEIN_IMAGE_STORE": "s3", "KLEIN_S3_BUCKET": "b", "KLEIN_URL_SIGNING_KEY": "x" * 32}, 8, "s3"),
    ],
    ids=["one-worker-memory", "workers-default-filesystem", "filesystem-configured", "env-overrides-file", "s3-from-env"],
)
def test_the_store_is_chosen_from_the_file_the_environment_and_workers(tmp_path: Path, cfg: dict[str, object], env: dict[str, str], workers: int, kind: str) -> None:
    def fill(v: object) -> object:
        return v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v

    store = open_image_store(settings(**{k: fill(v) for k, v in cfg.items()}), {k: fill(v) for k, v in env.items()}, workers=workers)
    assert store.kind == kind


@pytest.mark.parametrize(
    ("cfg", "env", "workers", "message"),
    [
        ({"kind": "memory"}, {}, 2, "memory cannot serve 2 workers"),
        ({}, {}, 4, "filesystem store needs a directory"),
        ({"kind": "s3"}, {}, 1, "needs a bucket"),
        ({"kind": "s3", "s3": {"bucket": "b"}}, {}, 1, "KLEIN_URL_SIGNING_KEY"),
        ({"kind": "filesystem"}, {"KLEIN_IMAGE_DIR": "/proc/klein-cannot-exist"}, 1, "cannot use /proc/klein-cannot-exist"),
        ({}, {"KLEIN_IMAGE_STORE": "redis"}, 1, "not one of memory, filesystem, s3"),
        ({}, {"KLEIN_IMAGE_URL_MODE": "presigned"}, 1, "presigned needs the s3 store"),
    ],
    ids=["memory-many-workers", "filesystem-no-path", "s3-no-bucket", "s3-gateway-urls-no-key", "unwritable-dir", "unknown-kind", "presigned-not-s3"],
)
def test_a_store_that_cannot_work_is_refused_with_what_to_set(cfg: dict[str, object], env: dict[str, str], workers: int, message: str) -> None:
    with pytest.raises(ImageStoreError, match=message):
        open_image_store(settings(**cfg), env, workers=workers)


def test_presigned_urls_on_a_local_store_are_refused_in_the_file() -> None:
    with pytest.raises(ValueError, match="presigned needs kind s3"):
        ImageStoreSettings(kind="filesystem", url_mode="presigned")


async def test_the_filesystem_store_without_a_key_signs_with_the_directorys(tmp_path: Path) -> None:
    a = open_image_store(settings(kind="filesystem", path=str(tmp_path)), {}, workers=1)
    b = open_image_store(settings(kind="filesystem", path=str(tmp_path)), {}, workers=1)
    ref = await a.put(png_bytes(8, 8), "image/png")
    url = await a.url(ref, "http://gw")
    q = parse_qs(urlsplit(url).query)
    assert b.signer.verify(ref.name, int(q["expires"][0]), q["sig"][0])


class StuckSweep(FilesystemImageStore):
    """A sweep that waits until the test lets it go, or fails."""

    def __init__(self, *args: object, fail: bool = False, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.fail = fail
        self.sweeps = 0

    async def sweep(self) -> int:
        self.sweeps += 1
        if self.fail:
            raise OSError("the volume went away")
        await self.release.wait()
        return await super().sweep()


async def test_a_put_never_waits_for_the_sweep_it_starts(tmp_path: Path) -> None:
    store = StuckSweep(tmp_path, ttl_s=TTL_S, max_bytes=1, signer=UrlSigner(b"k" * 32))  # every put is due a sweep
    first = await asyncio.wait_for(store.put(png_bytes(8, 8), "image/png"), 5)
    second = await asyncio.wait_for(store.put(png_bytes(8, 8), "image/png"), 5)
    assert store.sweeps == 1  # the second asked the running sweep to go once more
    store.release.set()
    await store.idle()
    assert store.sweeps == 2
    assert await store.get(first.name) is None and await store.get(second.name) is not None  # over the cap: the newest stays


async def test_a_failing_sweep_does_not_fail_the_put(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StuckSweep(tmp_path, ttl_s=TTL_S, max_bytes=1, signer=UrlSigner(b"k" * 32), fail=True)
    ref = await store.put(png_bytes(8, 8), "image/png")
    await store.idle()
    assert await store.get(ref.name) is not None
    assert "image store sweep failed: OSError" in caplog.text


KEEP_CASES = [
    # (keep_s, lives for): an image kept for a record lives as long, never less than the TTL
    (None, TTL_S),
    (TTL_S * 24, TTL_S * 24),
    (TTL_S // 2, TTL_S),
]


@pytest.mark.parametrize(("keep_s", "lives_s"), KEEP_CASES)
async def test_an_image_kept_for_a_record_lives_as_long_and_never_less_than_the_ttl(make_store: StoreFactory, keep_s: int | None, lives_s: int) -> None:
    clock = Clock()
    store = make_store(clock, 10_000_000)
    ref = await store.put(png_bytes(32, 32), "image/png", keep_s=keep_s)
    assert ref.expires_at == int(NOW) + lives_s
    clock.now += lives_s - 1
    assert await store.get(ref.name) is not None
    clock.now += 2
    assert await store.get(ref.name) is None


# ---- blobs: opaque bytes (uploaded files) beside the images; their expiry is in their
# name, the cap on images never evicts them, the sweep deletes them once expired ----
async def test_a_blob_reads_back_byte_for_byte_until_it_is_deleted(make_store: StoreFactory) -> None:
    store = make_store(Clock(), 10_000_000)
    name = new_blob_name(int(NOW) + 3600)
    data = bytes(range(256)) * 1000
    await store.put_blob(name, data)
    assert valid_blob_name(name) and await store.get_blob(name) == data
    await store.delete_blob(name)
    assert await store.get_blob(name) is None
    await store.delete_blob(name)  # deleting what is gone is not an error


async def test_a_blob_is_gone_once_the_expiry_in_its_name_passes(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(clock, 10_000_000)
    name = new_blob_name(int(NOW) + 10)
    await store.put_blob(name, b"line\n")
    clock.now += 10
    assert await store.get_blob(name) == b"line\n"
    clock.now += 1
    assert await store.get_blob(name) is None


async def test_the_image_cap_never_evicts_a_blob_and_the_sweep_deletes_only_expired_ones(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(clock, 5_000)  # smaller than the blob
    keep, drop = new_blob_name(int(NOW) + 3600), new_blob_name(int(NOW) + 5)
    big = b"b" * 20_000
    await store.put_blob(keep, big)
    await store.put_blob(drop, b"short-lived")
    refs = [await store.put(png_bytes(64, 64, color=(i * 50, 0, 0)), "image/png") for i in range(3)]
    await store.idle()
    await store.sweep()
    assert await store.get_blob(keep) == big
    assert await store.get(refs[-1].name) is not None  # the images' own cap still works
    clock.now += 6
    await store.sweep()
    assert await store.get_blob(keep) == big
    clock.now = NOW  # read as if unexpired again: the swept blob is gone from the store itself
    assert await store.get_blob(drop) is None


async def test_blob_names_come_from_new_blob_name_only(make_store: StoreFactory) -> None:
    store = make_store(Clock(), 10_000)
    for bad in ("../escape.blob", "1-short.blob", "x" * 40):
        with pytest.raises(ValueError):
            await store.put_blob(bad, b"x")
        assert await store.get_blob(bad) is None
