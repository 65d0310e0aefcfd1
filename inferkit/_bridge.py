"""Awaiting a ``concurrent.futures.Future`` with one event-loop wake-up per burst of results.

``asyncio.wrap_future`` wakes the loop once per future (a write to its self-pipe each). A batch
settles many futures at once from one worker thread; here they queue in a per-loop inbox and
the first of them schedules one drain, which hands every result over in a single loop turn.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any

__all__ = ["await_future"]


class _Inbox:
    """Settled futures waiting for their loop, and whether a drain is already scheduled."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weakly: the inbox is the value of a weak-keyed dict
        self._lock = threading.Lock()
        self._items: deque[tuple[asyncio.Future[Any], Future[Any]]] = deque()
        self._scheduled = False

    def put(self, waiter: asyncio.Future[Any], future: Future[Any]) -> None:
        with self._lock:
            self._items.append((waiter, future))
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
        for waiter, future in items:
            if waiter.done():  # the awaiting task was cancelled meanwhile
                continue
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.setdefault(loop, _Inbox(loop))
    return inbox


async def await_future(future: Future[Any]) -> Any:
    """``await`` ``future``'s outcome; cancelling the awaiting task cancels ``future``."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    inbox = _inbox(loop)
    future.add_done_callback(lambda done: inbox.put(waiter, done))
    try:
        return await waiter
    except asyncio.CancelledError:
        future.cancel()
        raise
