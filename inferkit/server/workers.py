"""The default executor of a server's own event loop: :class:`Workers`, threads that never hold up its exit.

asyncio's own (a :class:`~concurrent.futures.ThreadPoolExecutor`) is joined when its loop closes
(without a timeout on Python 3.11) and again when the interpreter exits, so a large decode, a
gRPC parse or a canary action still running when a shutdown's grace period was over kept
``inferkit serve`` alive until it ended, however long after. The requests that work was for
have been answered or cut off by then.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["Workers"]

_T = TypeVar("_T")
_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Workers(ThreadPoolExecutor):
    """Up to ``max_workers`` daemon threads; :meth:`shutdown` never waits for work still running.

    A :class:`~concurrent.futures.ThreadPoolExecutor` only because event loops take no other kind
    as their default executor: :meth:`submit` and :meth:`shutdown` are its own, and its threads
    are not the stdlib's (not joined at exit). ``max_workers`` defaults as asyncio's does. A
    thread idle for ``idle_s`` seconds ends (a burst of large requests leaves none behind), and
    every thread ends at :meth:`shutdown` once the jobs queued before it are run. Thread-safe.
    """

    def __init__(self, max_workers: int | None = None, name: str = "inferkit-worker", idle_s: float = 2.0) -> None:
        if max_workers is None:
            max_workers = min(32, (os.cpu_count() or 1) + 4)
        super().__init__(max_workers, name)  # its checks (ValueError below 1); starts nothing
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: a thread ends and passes it on
        self._idle_s = idle_s
        self._guard = threading.Lock()
        self._idle = 0  # threads waiting for a job, less the jobs queued for them (negative: jobs wait)
        self._started = 0  # threads started and not ended
        self._numbers = itertools.count(1)  # names threads
        self._closed = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Run ``fn(*args, **kwargs)`` on an idle thread, or a new one while there are fewer than ``max_workers``.

        ``RuntimeError`` after :meth:`shutdown`.
        """
        future: Future[_T] = Future()
        with self._guard:  # against shutdown: a job is never queued behind the end marker
            if self._closed:
                msg = "cannot schedule new futures after shutdown"
                raise RuntimeError(msg)
            self._jobs.put((future, fn, args, kwargs))
            self._idle -= 1
            if self._idle < 0 and self._started < self._max_workers:
                self._idle += 1
                self._started += 1
                name = f"{self._thread_name_prefix}_{next(self._numbers)}"
                try:
                    threading.Thread(target=self._work, name=name, daemon=True).start()
                except BaseException:  # no thread (out of threads or memory): the job is refused, not run later
                    self._idle -= 1
                    self._started -= 1
                    future.cancel()  # it stays queued (and counted) until a thread skips it
                    raise
        return future

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._guard:
                    if self._idle > 0:  # more threads wait than jobs are queued: one may go
                        self._idle -= 1
                        self._started -= 1
                        return
                continue
            if job is None:
                self._jobs.put(None)  # for the next thread
                return
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as error:  # noqa: BLE001 (the awaiting caller's to see, as the stdlib pool does)
                    future.set_exception(error)
            del job, future, fn, args, kwargs  # an idle thread holds nothing of its last job
            with self._guard:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:  # noqa: ARG002
        """Refuse new work and return at once (``wait`` is ignored): threads end once the queued jobs are run.

        ``cancel_futures`` cancels the jobs not yet started. Idempotent.
        """
        with self._guard:
            marked = not self._closed  # the first call queues the end marker
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        marked = True  # taken out with the jobs: put back
                    else:
                        job[0].cancel()
            if marked:
                self._jobs.put(None)
