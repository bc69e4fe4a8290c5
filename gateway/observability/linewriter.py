"""Finished log lines written by a thread of their own, never on the event loop.

A request's line is handed over with `submit()` (a deque append, no lock, no
I/O; the first line of a batch also sets an event). The thread then lingers
`LINGER_S` so the lines of requests close together gather, and writes them in
one `write` and one flush: one wake-up and one system call per batch, not per
request, since both cost the worker's CPU as much as the encoding does. When
the stream stops taking writes (stderr into a full pipe, a stalled log
collector), the queue fills to `max_lines` and further lines are dropped and
counted in `dropped`, not waited for: blocking even briefly would put the stuck
stream's delay on every request the loop serves, which is the stall this module
exists to avoid. The count is reported on the stream once it moves again.

`close()` writes every line submitted before it and joins the thread (the
app's shutdown path calls it, through `RequestLogger.close`); a line submitted
later starts the thread again. After `shutdown()` (the handler's close, at
interpreter exit) lines are written inline.
"""

from __future__ import annotations

import collections
import threading
import time
from datetime import UTC, datetime
from typing import Final, TextIO

MAX_LINES: Final = 10_000  # about 3 MB of request lines; seconds of traffic at full load
LINGER_S: Final = 0.02  # a line waits at most this long for others to share its write
JOIN_TIMEOUT_S: Final = 5.0  # a stuck stream must not hold shutdown forever


class LineWriter:
    """One writer thread for one text stream; `lock` is shared with the
    handler that writes other records to the same stream, so lines never interleave."""

    def __init__(self, stream: TextIO, lock: threading.RLock | None = None, *, max_lines: int = MAX_LINES) -> None:
        self.stream = stream
        self.lock = lock if lock is not None else threading.RLock()
        self.max_lines = max_lines
        self.dropped = 0
        self._reported = 0
        self._lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0  # submitted and not yet written, for `flush`
        self._stop = False
        self._shut = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, line: str) -> None:
        """Queue one line (newline included); drops and counts it when the queue is full."""
        if self._shut:
            self._write_now(line)
            return
        if len(self._lines) >= self.max_lines:
            self.dropped += 1
            return
        self._lines.append(line)
        if self._thread is None:
            self._start()
        if not self._wake.is_set():  # set once per batch; the thread lingers before it drains
            self._wake.set()

    def flush(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Wait until every line submitted so far is written; False if the stream stayed stuck."""
        if self._thread is None:
            self._drain()
            return True
        with self._idle:
            return self._idle.wait_for(lambda: not self._lines and self._pending == 0, timeout)

    def close(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Write what is queued and join the thread; False if it did not finish within `timeout`."""
        with self._start_lock:
            thread, self._thread = self._thread, None
            if thread is None:
                self._drain()
                return True
            self._stop = True
            self._wake.set()
        thread.join(timeout)
        self._stop = False
        if thread.is_alive():
            self._thread = thread  # still stuck in a write: it keeps the queue
            return False
        self._drain()  # a line submitted while the thread was stopping
        return True

    def shutdown(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """`close`, and write any later line inline: nothing is left to a thread at exit."""
        self.close(timeout)
        self._shut = True

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._shut:
                self._thread = threading.Thread(target=self._run, name="klein-log-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._stop:
                time.sleep(LINGER_S)  # let the lines of requests close together share one write
            self._wake.clear()  # before draining: a line appended after this wakes us again
            self._drain()
            if self._stop:
                self._drain()
                return

    def _drain(self) -> None:
        lines = self._lines
        while lines:
            batch: list[str] = []
            with self._idle:  # popped and counted as pending at once, so `flush` never sees neither
                while lines and len(batch) < 1024:
                    batch.append(lines.popleft())
                self._pending += len(batch)
            try:
                self._write_now("".join(batch))
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    self._idle.notify_all()
        with self._idle:
            self._idle.notify_all()

    def _write_now(self, text: str) -> None:
        with self.lock:
            try:
                if self.dropped != self._reported:
                    lost, self._reported = self.dropped - self._reported, self.dropped
                    ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                    text += f'{{"ts":"{ts}","level":"warning","logger":"klein.request","msg":"log stream was stuck: {lost} request line(s) dropped"}}\n'
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: the lines are lost, the gateway goes on
                pass
