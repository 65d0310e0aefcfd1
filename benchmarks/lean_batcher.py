"""The leanest dynamic batcher: how far any Python-threads batcher gets on this machine.

One worker thread and one ``session``. A caller appends ``[lock, rows]`` to a list under a
mutex, wakes the worker if it sleeps, and blocks on its own raw lock. The worker takes
what is queued (up to ``max_rows`` rows) the moment the model is free, runs it, writes each
caller's slice of the output into its entry and releases its lock. No timer, no checks,
no counters, no deadlines, no replicas, no errors handled: nothing a caller could lean on,
so nothing to pay for. ``bench_batching.py`` runs it beside inferkit so that each run shows
inferkit's share of it (what inferkit's features and safety cost) next to the share of the
model's limit (what a batcher in CPython can reach at all).
"""

from __future__ import annotations

import _thread
import threading
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["LeanBatcher"]

FloatArray = npt.NDArray[np.float32]


class LeanBatcher:
    """A worker thread, a list and a raw lock per caller."""

    def __init__(self, session: ort.InferenceSession, *, max_rows: int = 64) -> None:
        self._session = session
        self._input_name: str = session.get_inputs()[0].name
        self._max_rows = max_rows
        self._mutex = _thread.allocate_lock()
        self._queue: list[list[Any]] = []  # [lock, input rows, then output rows]
        self._idle = False
        self._wake = _thread.allocate_lock()
        self._wake.acquire()
        self._closed = False
        self.batches = 0
        self.rows = 0
        self._worker = threading.Thread(target=self._run, name="lean-batcher", daemon=True)
        self._worker.start()

    def predict(self, x: FloatArray) -> FloatArray:
        """Queue ``x`` (rows, features) and block until its output rows are ready."""
        done = _thread.allocate_lock()
        done.acquire()
        entry = [done, x]
        with self._mutex:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.append(entry)
            wake, self._idle = self._idle, False
        if wake:
            self._wake.release()
        done.acquire()
        out: FloatArray = entry[1]
        return out

    def close(self) -> None:
        """Stop the worker after it has served what is queued."""
        with self._mutex:
            self._closed = True
            wake, self._idle = self._idle, False
        if wake:
            self._wake.release()
        self._worker.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take(self) -> list[list[Any]]:
        """Queued entries up to ``max_rows`` rows (at least one); empty, marking the worker idle, if none."""
        with self._mutex:
            rows = taken = 0
            for entry in self._queue:
                rows += len(entry[1])
                if taken and rows > self._max_rows:
                    break
                taken += 1
            batch = self._queue[:taken]
            del self._queue[:taken]
            if not batch:
                self._idle = not self._closed
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                if self._closed:
                    return
                self._wake.acquire()
                continue
            x = batch[0][1] if len(batch) == 1 else np.concatenate([entry[1] for entry in batch])
            y: FloatArray = self._session.run(None, {self._input_name: x})[0]
            self.batches += 1
            self.rows += len(x)
            start = 0
            for entry in batch:
                stop = start + len(entry[1])
                entry[1] = y[start:stop]
                start = stop
                entry[0].release()
