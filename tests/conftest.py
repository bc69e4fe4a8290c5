# ---- shared state: a real redis-server, and a store fixture over memory and Redis ----

import uuid as _uuid

import pytest as _pytest

from tests.redis_server import RedisServer as _RedisServer
from tests.redis_server import redis_available as _redis_available
from tests.s3_server import moto_url, s3_bucket  # noqa: F401 - a loopback S3 server for the image store


@_pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session (loopback, no persistence); skips when
    redis-server is not installed. Tests isolate themselves by namespace."""
    if not _redis_available():
        _pytest.skip("redis-server is not installed")
    server = _RedisServer().start()
    yield server
    server.close()


@_pytest.fixture(params=["memory", "redis"])
async def state_store(request):
    """A StateStore of each kind; the Redis one has a namespace of its own."""
    from gateway.state.memory import MemoryStore

    if request.param == "memory":
        yield MemoryStore()
        return
    from gateway.state.redis import RedisStore

    server = request.getfixturevalue("redis_server")
    # These tests are about what the store does, not how fast it fails: a busy
    # machine opening 20 connections at once can take longer than the shipped 0.25 s.
    store = RedisStore.from_url(server.url, namespace=f"test-{_uuid.uuid4().hex[:12]}", socket_timeout=2.0)
    yield store
    await store.close()


# ---- the usage ledger: a real PostgreSQL server, started once per session ----

from tests.postgres_server import PostgresServer as _PostgresServer  # noqa: E402 - beside the fixture it serves
from tests.postgres_server import postgres_available as _postgres_available  # noqa: E402 - beside the fixture it serves


@_pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL for the session (loopback, fsync off); tests
    take a database each. Skips when PostgreSQL is not installed."""
    if not _postgres_available():
        _pytest.skip("PostgreSQL is not installed")
    server = _PostgresServer().start()
    yield server
    server.close()


# ---- the repository's own usage ledger stays untouched ----

from pathlib import Path as _Path  # noqa: E402 - beside the fixture it serves

_REPO_ROOT = _Path(__file__).resolve().parent.parent


def _ledger_files() -> dict[str, tuple[int, int]]:
    """Each usage.sqlite3* at the repository root (the ledger and its -wal/-journal), by mtime and size."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in _REPO_ROOT.glob("usage.sqlite3*")}


@_pytest.fixture(scope="session", autouse=True)
def repository_ledger_untouched():
    """Fails the run when a test wrote the repository's usage.sqlite3: every
    gateway a test builds or starts must use a ledger of its own
    (tests.gateway_support.NO_LEDGER, or a path under tmp_path)."""
    before = _ledger_files()
    yield
    after = _ledger_files()
    written = sorted(name for name, seen in after.items() if before.get(name) != seen)
    if written:
        _pytest.fail(f"tests wrote the repository's own ledger: {', '.join(written)} at {_REPO_ROOT}; give each gateway a temporary ledger (KLEIN_USAGE_LEDGER)")
