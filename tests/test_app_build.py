"""Gateway apps can be built from several threads at once, as the chaos and replica tests do.

litestar tries to import its attrs plugin on every `Litestar()`; without the
`attrs` package that import fails each time, and concurrent failing imports
race (one thread sees the half-initialised module). `attrs` is therefore a
declared dependency: the import succeeds once and is cached.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.gateway_support import make_app

THREADS = 8
ROUNDS = 3


def build_after(start: threading.Barrier) -> str:
    start.wait(timeout=30)  # every thread constructs at the same moment
    return type(make_app()).__name__


def test_apps_build_concurrently_in_threads() -> None:
    for _ in range(ROUNDS):
        start = threading.Barrier(THREADS)
        with ThreadPoolExecutor(THREADS) as pool:
            assert list(pool.map(build_after, [start] * THREADS)) == ["Litestar"] * THREADS
