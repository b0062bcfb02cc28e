"""The batcher: requests that arrive within a short window are generated together, one batch at a time.

The asyncio side submits :class:`lorakit.generation.Row` objects; one worker thread collects the rows that
arrive within ``window`` seconds of the previous one (at most ``max_batch`` rows and ``10 * window`` seconds) and hands them to
``InferenceModel.generate_rows`` (one left-padded batch, mixed adapters included). Each row streams its own
text through its callbacks and is done on its own; the batch ends with its longest row. A generation error
is handed to every row of its batch (``fail``), and the worker goes on with the next batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lorakit.generation import Row

_STOP = object()


class Batcher:
    """Collect rows into batches and generate them on one worker thread (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 16,
        window: float = 0.02,
        fail: Callable[[Row, BaseException], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.window = window
        self.fail = fail
        self.active = 0
        """Rows submitted and not done yet (queued or generating)."""
        self.cancelled = 0
        """Rows stopped early because their client went away."""
        self.batches = 0
        """Batches generated so far."""
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-generate")
        self._thread = threading.Thread(target=self._run, name="lorakit-batcher", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> None:
        """Queue ``row`` for the next batch (thread-safe)."""
        with self._lock:
            self.active += 1
        self._queue.put(row)

    def close(self) -> None:
        """Generate what is queued, then stop the worker (the server's shutdown)."""
        self._queue.put(_STOP)
        self._thread.join()
        self._executor.shutdown(wait=True)

    def _collect(self) -> tuple[list[Row], bool]:
        """The next batch: the first queued row and those arriving within the window; True when stopping."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        rows = [first]
        start = time.monotonic()
        deadline = start + self.window
        while len(rows) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is _STOP:
                return rows, True
            rows.append(item)
            # A burst keeps the batch open: each arrival waits one more window, at most 10 windows in all.
            deadline = min(time.monotonic() + self.window, start + 10 * self.window)
        return rows, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            rows, stopping = self._collect()
            if rows:
                self._generate(rows)

    def _generate(self, rows: list[Row]) -> None:
        self.batches += 1
        error = self._executor.submit(self.model.generate_rows, rows).exception()
        for row in rows:
            if error is not None and not row.done and self.fail is not None:
                self.fail(row, error)
        with self._lock:
            self.active -= len(rows)
            self.cancelled += sum(row.finish_reason == "cancelled" for row in rows)
