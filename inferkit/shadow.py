"""Shadow traffic: the router's mirrors carried to their candidate arm and compared with the primary.

The :class:`~inferkit.policies.Shadow` policy decides which requests are mirrored;
:class:`ShadowTraffic` carries them off the caller's thread and counts how they compared.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import attrs
import numpy as np

from inferkit.arrays import copied

__all__ = ["ShadowStats", "ShadowTraffic", "agree"]


@attrs.frozen
class ShadowStats:
    """Mirrored requests and how they compared with the primary.

    ``sent`` went to the candidate (each ends agreed, disagreed or in error); ``dropped`` never
    did, because the shadow queue was full (or still held them at close). A request the primary
    refused is neither.
    """

    sent: int
    dropped: int
    agreed: int
    disagreed: int
    errors: int


def agree(a: Any, b: Any) -> bool:
    """Default shadow comparison: same keys and close arrays (rtol 1e-4, atol 1e-5; NaN where both have NaN)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(agree(a[k], b[k]) for k in a)
    try:
        x, y = np.asarray(a), np.asarray(b)
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc" or y.dtype.kind in "fc":
            return bool(np.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True))
        return bool(np.array_equal(x, y))
    except (TypeError, ValueError):
        return False


def _plus_one(stats: ShadowStats, field: str) -> ShadowStats:
    return attrs.evolve(stats, **{field: getattr(stats, field) + 1})


class ShadowTraffic:
    """A router's mirrored requests: a bounded queue, one sender thread, and the comparison counts.

    ``submit(arm, x)`` sends to the arm in force when the mirror is sent (so a swapped arm gets
    its mirrors); ``announce(arm)`` tells the router's policy of each mirror before it is
    queued and returns ``settle(outcome)``, called once with ``"agreed"``, ``"disagreed"`` or
    ``"errors"`` (it tells the same policy, whatever is in force by then).
    ``_lock`` guards ``_pending``, ``_stats`` (a frozen value, replaced whole on each change, so
    :meth:`stats` reads it without the lock), ``_thread`` and ``_closed``; the queue locks itself.
    """

    __slots__ = (
        "_announce",
        "_closed",
        "_compare",
        "_limit",
        "_lock",
        "_name",
        "_pending",
        "_queue",
        "_stats",
        "_submit",
        "_thread",
    )

    def __init__(
        self,
        name: str,
        submit: Callable[[str, Any], Future[Any]],
        compare: Callable[[Any, Any], bool],
        announce: Callable[[str], Callable[[str], None]],
        limit: int,
    ) -> None:
        self._name = name
        self._submit = submit
        self._compare = compare
        self._announce = announce
        self._limit = limit
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()  # sends and compares
        self._pending = 0  # mirrors queued or running on the candidate
        self._thread: threading.Thread | None = None
        self._stats = ShadowStats(sent=0, dropped=0, agreed=0, disagreed=0, errors=0)
        self._closed = False

    def stats(self) -> ShadowStats:
        """The counts so far."""
        return self._stats

    def take(self, x: Any) -> tuple[Any] | None:
        """A copy of ``x`` to :meth:`mirror`, or None when the queue is full (then :meth:`drop` it).

        Taken before the primary arm runs: its model may write into its input, and a caller reuse
        it once its call returns. Nothing is counted here: a request the primary refuses is no
        mirror lost.
        """
        if self._pending >= self._limit or self._closed:  # read without the lock: a full queue costs no copy
            return None
        return (copied(x),)

    def mirror(self, arm: str, taken: tuple[Any], primary: Future[Any]) -> None:
        """Queue what :meth:`take` took for ``arm``, to compare with ``primary``; drop (and count) it when full."""
        (copy,) = taken
        # Told before it can be compared (a canary's step waits for its mirrors), outside the lock (a
        # policy's decision runs user callbacks, which may route again).
        settle = self._announce(arm)
        with self._lock:
            queued = self._pending < self._limit and not self._closed
            if queued:
                self._pending += 1
                self._stats = _plus_one(self._stats, "sent")
                if self._thread is None:
                    name = f"inferkit-shadow-{self._name}"
                    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
                    self._thread.start()
                self._queue.put(functools.partial(self._send, arm, copy, primary, settle))  # before close's None
        if not queued:  # filled (or closed) meanwhile: told as never compared
            self.drop()
            settle("errors")

    def drop(self) -> None:
        """Count a mirror that :meth:`take` had no room for, once the primary accepted its request."""
        with self._lock:
            self._stats = _plus_one(self._stats, "dropped")

    def close(self, timeout: float | None = None) -> None:
        """Take no more mirrors; hand the queued ones to their arm, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        """Hand mirrors to their arm without waiting (the candidate batches them like live traffic); compare them."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            item()

    def _send(self, arm: str, x: Any, primary: Future[Any], settle: Callable[[str], None]) -> None:
        try:
            mirrored = self._submit(arm, x)
        except Exception:  # noqa: BLE001 (a refused mirror is counted, never raised)
            self._done(None, primary, settle)
            return

        def mirrored_done(_: Future[Any]) -> None:
            primary.add_done_callback(lambda _: self._compare_later(mirrored, primary, settle))

        mirrored.add_done_callback(mirrored_done)

    def _compare_later(self, mirrored: Future[Any], primary: Future[Any], settle: Callable[[str], None]) -> None:
        """Both are done: compare on this traffic's thread, never on the thread that settled either.

        That is the primary arm's worker when the mirror finished first: a slow ``compare``
        there held up every request of the primary arm.
        """
        with self._lock:
            if not self._closed:
                self._queue.put(functools.partial(self._done, mirrored, primary, settle))
                return
        self._done(mirrored, primary, settle)  # the thread is stopping: compared here

    def _done(self, mirrored: Future[Any] | None, primary: Future[Any], settle: Callable[[str], None]) -> None:
        if any(f is None or f.cancelled() or f.exception() is not None for f in (mirrored, primary)):
            outcome = "errors"
        else:
            assert mirrored is not None
            try:
                outcome = "agreed" if self._compare(mirrored.result(), primary.result()) else "disagreed"
            except BaseException:  # noqa: BLE001 (a compare that raises anything, SystemExit too: counted, its slot freed)
                outcome = "errors"
        with self._lock:
            self._pending -= 1
            self._stats = _plus_one(self._stats, outcome)
        settle(outcome)
