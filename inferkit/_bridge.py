"""Handing results to asyncio with one event-loop wake-up per burst of results.

``asyncio.wrap_future`` wakes the loop once per future (a write to its self-pipe each). A batch
settles many requests at once from one worker thread; here their outcomes queue in a per-loop
inbox and the first of them schedules one drain, which hands every result over in a single
loop turn. :func:`deliver_to` feeds the inbox directly (``Predictor.apredict``: no
``concurrent.futures.Future`` at all); :func:`await_future` feeds it from a future.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["await_future", "deliver_to"]


class _Inbox:
    """Outcomes waiting for their loop, and whether a drain is already scheduled."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weakly: the inbox is the value of a weak-keyed dict
        self._lock = threading.Lock()
        # Waiters weakly: a waiter holds its loop, and a loop closed with a drain scheduled (its
        # callback dropped) would keep its inbox, and every outcome in it, alive for good.
        self._items: deque[tuple[weakref.ref[asyncio.Future[Any]], Any, BaseException | None]] = deque()
        self._scheduled = False

    def put(self, waiter: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._items.append((weakref.ref(waiter), value, error))
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop()
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # closed
                loop = None
        if loop is None:  # nobody is left to await these
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for ref, value, error in items:
            waiter = ref()
            if waiter is None or waiter.done():  # its task is gone, or was cancelled meanwhile
                continue
            if error is _CANCELLED:
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(value)


_CANCELLED = asyncio.CancelledError()  # a mark: the future was cancelled
_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.setdefault(loop, _Inbox(loop))
    return inbox


def deliver_to(waiter: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
    """A function, callable from any thread, that hands ``(value, error)`` to ``waiter`` on its loop.

    Outcomes delivered together (a batch's) reach the loop in one wake-up.
    """
    return functools.partial(_inbox(waiter.get_loop()).put, waiter)


async def await_future(future: Future[Any]) -> Any:
    """``await`` ``future``'s outcome; cancelling the awaiting task cancels ``future``."""
    waiter = asyncio.get_running_loop().create_future()
    deliver = deliver_to(waiter)
    future.add_done_callback(lambda done: deliver(*_outcome(done)))
    try:
        return await waiter
    except asyncio.CancelledError:
        future.cancel()
        raise


def _outcome(done: Future[Any]) -> tuple[Any, BaseException | None]:
    if done.cancelled():
        return None, _CANCELLED
    error = done.exception()
    return (None, error) if error is not None else (done.result(), None)
