"""What the batcher tells the outside: its events, its counters, its replicas' backends, its health.

:class:`Events` is where events go (and whether per-batch ones are wanted); :class:`Reporting`,
a mixin of :class:`~inferkit.batching.batcher.Batcher`, answers ``stats``, ``backends`` and
``healthy`` under the batcher's one lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferkit.batching.request import Announcement
from inferkit.events import BatchDone, RequestsFailed
from inferkit.stats import ReplicaStats, Stats

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable, Sequence

    from inferkit.backends.base import Backend
    from inferkit.batching.counters import Counters
    from inferkit.batching.lane import Batch, Lane
    from inferkit.batching.replicas import ReplicaSet
    from inferkit.batching.request import Request, Settled
    from inferkit.events import Event
    from inferkit.pool import Replica

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

    def _announcing(self) -> bool:
        """Whether per-request events are wanted (as per-batch ones: an observer of its own, a tap, DEBUG)."""
        return self._events.emit is not None and self._events.verbose()

    def _batch_done(
        self, batch: Batch, replica: Replica, spent: float, failed: Sequence[int] = (), retried: Sequence[int] = ()
    ) -> BatchDone:
        """The ``BatchDone`` of ``batch``, run on ``replica`` for ``spent`` seconds."""
        ids = tuple(r.id for r in batch.requests)
        return BatchDone(
            self._set.name, replica.name, ids, batch.rows, batch.reason, spent, tuple(failed), tuple(retried)
        )

    def _requests_failed(self, ids: tuple[int, ...], kind: str, message: str, *, later: bool) -> None:
        """One ``RequestsFailed``; ``later``: decided under the lock, emitted once it is released (``_event_later``)."""
        event = RequestsFailed(self._set.name, ids, kind, message)
        if later:
            self._event_later(event)
        else:
            self._event(event)

    def _ended_unrun(self, requests: Iterable[Request], *, later: bool) -> None:
        """``RequestsFailed`` for settled ``requests`` that no batch ended, one per distinct error; when wanted."""
        if not self._announcing():
            return
        by_error: dict[tuple[str, str], list[int]] = {}
        for req in requests:
            by_error.setdefault((type(req.error).__name__, str(req.error)), []).append(req.id)
        for (kind, message), ids in by_error.items():
            self._requests_failed(tuple(ids), kind, message, later=later)

    def _cancelled(self, requests: list[Request], *, later: bool) -> None:
        """``RequestsFailed`` (``CancelledError``) for requests their callers cancelled while queued, when wanted."""
        if self._announcing():
            ids = tuple(r.id for r in requests)
            self._requests_failed(ids, "CancelledError", "cancelled by its caller while queued", later=later)

    def _refused(self, request: Request, error: BaseException) -> None:
        """``RequestsFailed`` for a request refused at admission (no lock held), when wanted."""
        if self._announcing():
            self._requests_failed((request.id,), type(error).__name__, str(error), later=False)

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
