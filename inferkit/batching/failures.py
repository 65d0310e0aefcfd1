"""What a failed batch means for its requests and its replicas.

A request that failed on one replica gets one more try on another (``_retry``); a verdict on a
replica may eject it (``_health``); each distinct model error is reported once (``_failures``);
and after a bug of inferkit's own the batch is still answered and its replica freed
(``_salvage``). A mixin of :class:`~inferkit.batching.batcher.Batcher`; every method here runs
under the batcher's one lock, except ``_failures``, which only emits events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferkit.backends.base import ReplicaFault
from inferkit.batching.request import DONE, QUEUED, Request
from inferkit.errors import ExecutionTimeout, ModelError
from inferkit.events import ModelFailed, ReplicaEjected
from inferkit.pool import record_batch

if TYPE_CHECKING:
    import threading
    from collections.abc import Sequence

    from inferkit.batching.counters import Counters
    from inferkit.batching.execute import Outcome
    from inferkit.batching.lane import Batch
    from inferkit.batching.replicas import ReplicaSet
    from inferkit.batching.request import Settled
    from inferkit.events import Event
    from inferkit.pool import PoolConfig, Replica

__all__ = ["Failures"]


class Failures:
    """Retries, health verdicts and salvage, over the state the batcher owns."""

    pool: PoolConfig
    _drained: threading.Condition
    _set: ReplicaSet
    _closing: bool
    _running: dict[str, Batch]
    _counts: Counters

    if TYPE_CHECKING:  # provided by the batcher and its other parts

        @property
        def name(self) -> str:
            """The model's name."""

        def _event(self, event: Event) -> None: ...

        def _event_later(self, event: Event) -> None: ...

        def _after_ejection(self, replica: Replica) -> None: ...

    def _failures(self, outcomes: list[Outcome]) -> None:
        """One ``ModelFailed`` per distinct model error of a batch (a LogObserver logs each error once)."""
        by_error: dict[tuple[type, str], tuple[BaseException, list[int]]] = {}
        for req, _, error in outcomes:
            if isinstance(error, ModelError | ReplicaFault):
                cause = error.__cause__ or error
                by_error.setdefault((type(cause), str(cause)), (cause, []))[1].append(req.id)
        for cause, ids in by_error.values():
            self._event(ModelFailed(self.name, tuple(ids), cause))

    def _salvage(self, batch: Batch, replica: Replica, bug: Exception, done: Sequence[Settled]) -> list[Request]:
        """After a bug of inferkit's own in ``_finish``: fail the batch's undelivered requests, free the replica."""
        delivered = {id(r) for r in done}
        ended = []
        for req in batch.requests:
            top = req.parent or req
            if req.state is QUEUED or id(top) in delivered:  # queued again for a retry, or answered
                continue
            delivered.add(id(top))
            if top.split is not None:
                if not top.split.open:
                    continue
                top.split.open = False
            top.state = DONE
            top.value, top.error = None, ModelError(f"inferkit failed finishing the batch of request {top.id}")
            top.error.__cause__ = bug
            self._counts.ended(top.error)
            ended.append(top)
        self._running.pop(replica.name, None)
        replica.busy = False
        replica.running_rows = 0
        self._drained.notify_all()
        return ended

    def _retry(self, req: Request, replica: Replica, error: BaseException, *, fault: bool, now: float) -> bool:
        """Queue a request that failed on ``replica`` for one try on another replica; whether it was."""
        if req.avoid is not None or self._closing:
            return False
        if not fault and (not isinstance(error, ModelError) or isinstance(error, ExecutionTimeout)):
            return False  # the request's own error (InvalidInput from the backend): no retry
        if self._set.balancer is None:
            lane = replica.lane
            if not lane.usable_besides(replica, now):
                return False
        else:
            lanes = self._set.other_lanes(replica.lane, now)
            if not lanes:
                return False
            lane = self._set.choose(lanes)
        key = self._set.key  # run alone on its caller's thread, it had none
        if key is not None and req.key is None and req.inputs is not None:
            try:
                req.key = key(req.inputs)
            except Exception:  # noqa: BLE001 (no queue can take it: its own error stands)
                return False
        req.avoid = replica
        req.blame = not fault  # a fault is counted already
        req.state = QUEUED
        lane.push(req, now)
        lane.wake()
        self._counts.retried += 1
        return True

    def _health(self, replica: Replica, *, ok: bool, now: float) -> None:
        """Record a verdict on ``replica``; eject it when that is the verdict's consequence."""
        if record_batch(replica, ok, now, self.pool, self._set.all):
            cooldown = replica.ejected_until - now
            self._event_later(ReplicaEjected(self.name, replica.name, replica.consecutive_failures, cooldown))
            self._after_ejection(replica)
