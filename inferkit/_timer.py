"""One background thread that runs callbacks at monotonic times, started on first use."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Timer"]

_COMPACT_MIN = 64  # cancelled entries tolerated before the heap is rebuilt without them


class Timer:
    """Runs each scheduled callback once, at or after its time, on one daemon thread.

    Callbacks must be short and must not raise; they run in scheduling order. Nothing is
    started until the first :meth:`schedule`, so a predictor that never uses deadlines or
    execution timeouts runs no extra thread. :meth:`cancel` drops a callback at once (with
    whatever it holds); the heap entry's empty shell goes when cancelled entries outnumber
    live ones, so memory follows what is still scheduled, never what was ever scheduled.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[list[object]] = []  # [when, seq, fn or None once cancelled]
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None
        self._stopped = False

    def schedule(self, when: float, fn: Callable[[], None]) -> list[object]:
        """Run ``fn`` at ``time.monotonic() >= when``; ignored once closed. Returns a handle for :meth:`cancel`."""
        entry: list[object] = [when, next(self._seq), fn]
        with self._cond:
            if self._stopped:
                return entry
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, handle: list[object]) -> None:
        """Drop a scheduled callback that has not run yet (a no-op after it ran or was cancelled)."""
        with self._cond:
            if handle[2] is None:
                return
            handle[2] = None
            self._cancelled += 1
            if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def pending(self) -> int:
        """Callbacks scheduled and neither run nor cancelled."""
        with self._cond:
            return sum(e[2] is not None for e in self._heap)

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                head = self._heap[0]
                if head[2] is None:  # cancelled
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                    continue
                wait = head[0] - time.monotonic()  # type: ignore[operator]
                if wait > 0:
                    self._cond.wait(min(wait, threading.TIMEOUT_MAX))
                    continue
                heapq.heappop(self._heap)
                fn: Callable[[], None] = head[2]  # type: ignore[assignment]
                head[2] = None  # ran: a later cancel() is a no-op
                self._cond.release()
                try:
                    fn()
                finally:
                    self._cond.acquire()

    def runs_here(self) -> bool:
        """Whether the calling thread is this timer's (a callback of its running)."""
        return self._thread is threading.current_thread()

    def close(self, timeout: float | None = None) -> None:
        """Drop what is scheduled and stop the thread."""
        with self._cond:
            self._stopped = True
            for entry in self._heap:
                entry[2] = None
            self._heap.clear()
            self._cancelled = 0
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
