"""A deliberately simple dynamic batcher: the straw man of ``bench_batching.py``.

One ``queue.Queue`` of ``(rows, Future)`` requests and one worker thread. The
worker blocks for the first request, then keeps taking requests until either
``max_items`` requests are in hand or ``max_delay_ms`` has passed since the
first one arrived, concatenates them, makes one ``session.run`` call and splits
the output back over the requests' futures.

It is what most people write first, and it is correct; what it lacks is what a
real batcher adds: a single model call at a time (no overlap of batching with
execution), no replicas, no back-pressure, no deadlines, and a timer that is a
``Condition.wait`` inside ``Queue.get`` whose wake-up competes for the GIL with
every client thread.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Self

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["NaiveBatcher"]

FloatArray = npt.NDArray[np.float32]
_Request = tuple[FloatArray, "Future[FloatArray]"]


class NaiveBatcher:
    """Queue + one worker thread + ``concurrent.futures.Future`` per request."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        max_items: int = 64,
        max_delay_ms: float = 2.0,
    ) -> None:
        self._session = session
        self._input_name: str = session.get_inputs()[0].name
        self._max_items = max_items
        self._max_delay_s = max_delay_ms / 1000.0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = False
        self.batches = 0
        self.rows = 0
        self._worker = threading.Thread(target=self._run, name="naive-batcher", daemon=True)
        self._worker.start()

    def predict(self, x: FloatArray) -> FloatArray:
        """Queue ``x`` (rows, features) and block until its output rows are ready."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        future: Future[FloatArray] = Future()
        self._queue.put((x, future))
        return future.result()

    def close(self) -> None:
        """Stop the worker after it drains what is already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self._max_delay_s
            while len(batch) < self._max_items:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._execute(batch)

    def _execute(self, batch: list[_Request]) -> None:
        inputs = [x for x, _ in batch]
        try:
            x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
            y: FloatArray = self._session.run(None, {self._input_name: x})[0]
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        self.batches += 1
        self.rows += len(x)
        start = 0
        for rows, future in batch:
            stop = start + len(rows)
            future.set_result(y[start:stop])
            start = stop
