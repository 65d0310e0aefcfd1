"""One background thread that runs callbacks at monotonic times, started on first use."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Timer"]


class Timer:
    """Runs each scheduled callback once, at or after its time, on one daemon thread.

    Callbacks must be short and must not raise; they run in scheduling order. Nothing is
    started until the first :meth:`schedule`, so a predictor that never uses deadlines or
    execution timeouts runs no extra thread.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def schedule(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at ``time.monotonic() >= when``; ignored once closed."""
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is fn:
                self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, threading.TIMEOUT_MAX))
                    continue
                fn = heapq.heappop(self._heap)[2]
                self._cond.release()
                try:
                    fn()
                finally:
                    self._cond.acquire()

    def close(self, timeout: float | None = None) -> None:
        """Drop what is scheduled and stop the thread."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
