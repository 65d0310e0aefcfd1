"""Requests that leave the queue without running: cancelled by their caller, or past their deadline.

A mixin of :class:`~inferkit.batching.batcher.Batcher`, kept apart so that each file reads in
one sitting; every method here takes the batcher's one lock.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from inferkit.batching.lane import drop, unstarted
from inferkit.batching.request import DONE, Request
from inferkit.errors import DeadlineExceeded
from inferkit.events import RequestsExpired

if TYPE_CHECKING:
    import threading

    from inferkit._timer import Timer
    from inferkit.batching.counters import Counters
    from inferkit.events import Event

__all__ = ["Deadlines", "expired"]


class Deadlines:
    """Cancellation and deadlines, over the state the batcher owns."""

    _lock: threading.Lock
    _drained: threading.Condition
    _timer: Timer
    _counts: Counters

    if TYPE_CHECKING:  # provided by the batcher and its other parts

        @property
        def name(self) -> str:
            """The model's name."""

        def _event(self, event: Event) -> None: ...

        def _cancelled(self, requests: list[Request], *, later: bool) -> None: ...

    def cancel(self, top: Request) -> None:
        """The caller gave up on ``top`` (cancelled its future or task): take what of it is queued off the queues."""
        with self._lock:
            dropped = unstarted(top) and drop(top)
            if dropped:
                self._counts.cancelled += 1
            self._drained.notify_all()
        if dropped:
            self._cancelled([top], later=False)
        if top.state is DONE:  # never settled now: its deadline entry would hold the timer until it passes
            top.forget_deadline()

    def withdraw(self, request: Request) -> bool:
        """Fail ``request`` with ``DeadlineExceeded`` if none of it has started; whether it was."""
        with self._lock:
            if not unstarted(request):  # a split request runs from its first part
                return False
            drop(request)
            request.error = expired(request)
            self._counts.ended(request.error)
            self._drained.notify_all()
        self._event(RequestsExpired(self.name, (request.id,)))
        return True

    def expire_at(self, request: Request, deadline: float) -> None:
        """Settle a queued ``request`` with ``DeadlineExceeded`` at ``deadline``, promptly."""
        ref = weakref.ref(request)  # the timer must not keep a finished request (and its arrays) alive

        def expire() -> None:
            alive = ref()
            if alive is not None and self.withdraw(alive):
                alive.settle()

        entry = self._timer.schedule(deadline, expire)
        request.expiry = (self._timer, entry)
        if request.state is DONE or (request.future is not None and request.future.done()):  # settled already
            self._timer.cancel(entry)


def expired(request: Request) -> DeadlineExceeded:
    """The error of a request whose deadline passed while it was queued (by the timer or at the queue's head)."""
    return DeadlineExceeded(f"request {request.id} waited past its deadline")
