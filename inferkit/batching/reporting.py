"""What the batcher tells the outside: its events, its counters, its replicas' backends, its health.

:class:`Events` is where events go (and whether per-batch ones are wanted); :class:`Reporting`,
a mixin of :class:`~inferkit.batching.batcher.Batcher`, answers ``stats``, ``backends`` and
``healthy`` under the batcher's one lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferkit.batching.request import Announcement
from inferkit.stats import ReplicaStats, Stats

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from inferkit.backends.base import Backend
    from inferkit.batching.counters import Counters
    from inferkit.batching.lane import Lane
    from inferkit.batching.replicas import ReplicaSet
    from inferkit.batching.request import Settled
    from inferkit.events import Event

__all__ = ["Events", "Reporting"]


class Events:
    """Where a batcher's events go: ``emit`` (None: nowhere), and ``verbose()``, whether per-batch ones are wanted."""

    __slots__ = ("emit", "verbose")

    def __init__(self, emit: Callable[[Event], None] | None, verbose: Callable[[], bool]) -> None:
        self.emit = emit
        self.verbose = verbose


class Reporting:
    """Events out, and read-only views of the state the batcher owns."""

    _clock: Callable[[], float]
    _lock: threading.Lock
    _set: ReplicaSet
    _counts: Counters
    _events: Events
    _settle_later: list[Settled]

    def _event(self, event: Event) -> None:
        if self._events.emit is not None:
            self._events.emit(event)

    def _event_later(self, event: Event) -> None:
        """``_event`` for an event decided under the lock: emitted once it is released."""
        if self._events.emit is not None:
            self._settle_later.append(Announcement(self._events.emit, event))

    def stats(self, state: str) -> Stats:
        """A consistent snapshot of the counters."""
        with self._lock:
            replicas = tuple(
                ReplicaStats(
                    r.name,
                    r.state.value,
                    r.backend.device,
                    r.batches,
                    r.requests,
                    r.failed_batches,
                    r.ejections,
                    *r.percentiles(),
                )
                for r in self._set.all
            )
            queued_rows = sum(ln.rows for ln in self._set.lanes)
            return self._counts.snapshot(state, self._set.queued()[0], queued_rows, replicas, self._set.loading)

    @property
    def lanes(self) -> tuple[Lane, ...]:
        """The queues, for inspection: one shared by every replica, or one each with a balancer."""
        with self._lock:
            return tuple(self._set.lanes)

    def backends(self) -> tuple[Backend, ...]:
        """The backends of the replicas now in the pool, in the order of ``stats().replicas``."""
        with self._lock:
            return tuple(r.backend for r in self._set.all)

    def healthy(self) -> bool:
        """Whether at least one replica can take work now."""
        now = self._clock()
        with self._lock:
            return self._set.usable(now)
