"""The batcher: one worker thread generates every request, continuously (the default) or in static batches.

The asyncio side submits :class:`lorakit.generation.Row` objects. Each row streams its own text through its
callbacks and is done on its own.

- ``continuous`` (iteration-level batching): a :class:`lorakit.generation.ContinuousBatch` decodes every
  running row one token per step. Between steps, the rows that arrived join (one prefill for those queued
  together, at most ``max_batch`` rows running) and the rows that are done leave at once, so a request never
  waits for another request's whole generation. Mixed LoRA adapters share the batch (PEFT
  ``adapter_names``). When the batch is empty, the worker waits for a request and collects those arriving
  within ``window`` seconds of the previous one (at most ``10 * window``), so a burst is prefilled together.
- ``static``: the rows collected like that run as one left-padded batch through
  ``InferenceModel.generate_rows`` (one ``model.generate`` call); the batch ends with its longest row and a
  request that arrives meanwhile waits for it. Prompt-based adapters need this one.
- ``auto``: continuous when the model allows it (LoRA adapters only, a full-attention KV cache, no
  generation defaults it cannot apply), else static.

A generation error is handed to every row it hit (``fail``), and the worker goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lorakit.errors import ConfigError
from lorakit.generation import ContinuousBatch, Row

SCHEDULERS = ("auto", "continuous", "static")
_STOP = object()
_log = logging.getLogger(__name__)


class Batcher:
    """Generate submitted rows on one worker thread (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 16,
        window: float = 0.02,
        fail: Callable[[Row, BaseException], None] | None = None,
        scheduler: str = "auto",
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}.")
        self.model = model
        self.max_batch = max_batch
        self.window = window
        self.fail = fail
        self.active = 0
        """Rows submitted and not done yet (queued or generating)."""
        self.cancelled = 0
        """Rows stopped early because their client went away."""
        self.batches = 0
        """Batches started so far (continuous: prefills, each admitting the rows queued together)."""
        self._decoder = self._continuous(scheduler)
        self.scheduler = "continuous" if self._decoder is not None else "static"
        """The scheduler in use: ``continuous`` or ``static``."""
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-generate")
        run = self._run_continuous if self._decoder is not None else self._run
        self._thread = threading.Thread(target=run, name="lorakit-batcher", daemon=True)
        self._thread.start()

    def _continuous(self, scheduler: str) -> ContinuousBatch | None:
        """The continuous batch of ``model`` (None: static); ``auto`` falls back to static with a log line."""
        if scheduler == "static":
            return None
        try:
            return self.model.continuous_batch()
        except ConfigError as error:
            if scheduler == "continuous":
                raise
            _log.warning("lorakit serve: static batching (%s)", error)
            return None

    @property
    def steps(self) -> int:
        """Decode steps of the continuous scheduler so far (0 under static batching)."""
        return self._decoder.steps if self._decoder is not None else 0

    def submit(self, row: Row) -> None:
        """Queue ``row`` for generation (thread-safe)."""
        with self._lock:
            self.active += 1
        self._queue.put(row)

    def close(self) -> None:
        """Generate what is queued and running, then stop the worker (the server's shutdown)."""
        self._queue.put(_STOP)
        self._thread.join()
        self._executor.shutdown(wait=True)

    def _collect(self, limit: int) -> tuple[list[Row], bool]:
        """The next batch: the first queued row and those arriving within the window; True when stopping."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        rows = [first]
        start = time.monotonic()
        deadline = start + self.window
        while len(rows) < limit:
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

    def _drain(self, limit: int) -> tuple[list[Row], bool]:
        """The rows queued right now (at most ``limit``), without waiting; True when stopping."""
        rows: list[Row] = []
        while len(rows) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return rows, True
            rows.append(item)
        return rows, False

    def _finished(self, rows: list[Row], error: BaseException | None = None) -> None:
        """Account for rows that left the generator; rows an error stopped get ``fail``."""
        for row in rows:
            if error is not None and not row.done and self.fail is not None:
                self.fail(row, error)
        with self._lock:
            self.active -= len(rows)
            self.cancelled += sum(row.finish_reason == "cancelled" for row in rows)

    # --- static -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            rows, stopping = self._collect(self.max_batch)
            if rows:
                self._generate(rows)

    def _generate(self, rows: list[Row]) -> None:
        self.batches += 1
        error = self._executor.submit(self.model.generate_rows, rows).exception()
        self._finished(rows, error)

    # --- continuous ---------------------------------------------------------------------------------------

    def _run_continuous(self) -> None:
        """Admit what arrived, decode one step, repeat; wait (and collect a burst) only when idle."""
        decoder = self._decoder
        assert decoder is not None
        stopping = False
        while not stopping or len(decoder):
            room = self.max_batch - len(decoder)
            if stopping or room <= 0:
                rows: list[Row] = []
            elif len(decoder):
                rows, stopping = self._drain(room)
            else:
                rows, stopping = self._collect(room)
            if rows:
                self._admit(decoder, rows)
            if len(decoder):
                self._step(decoder)

    def _admit(self, decoder: ContinuousBatch, rows: list[Row]) -> None:
        self.batches += 1
        future = self._executor.submit(decoder.add, rows)
        error = future.exception()
        if error is None:
            self._finished(future.result())
        elif any(row in decoder.rows for row in rows):  # failed after they joined: the cache is suspect
            self._finished(rows + [row for row in decoder.drop() if row not in rows], error)
        else:  # the prefill failed before they joined: the running rows go on
            self._finished(rows, error)

    def _step(self, decoder: ContinuousBatch) -> None:
        future = self._executor.submit(decoder.step)
        error = future.exception()
        self._finished(decoder.drop() if error is not None else future.result(), error)
