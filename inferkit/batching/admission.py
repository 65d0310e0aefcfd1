"""What may be queued: a request's parts and bytes against the config, the queue's room, its batch key.

A mixin of :class:`~inferkit.batching.batcher.Batcher`. ``_admit`` runs before the batcher's lock
(a request no queue could ever hold is refused without it); ``_refusal`` and ``_refuse`` run under it;
``_keyed`` before it (a request not yet shared); ``reject`` takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from inferkit.batching.request import Inputs, Request, object_bytes
from inferkit.errors import Closed, InferkitError, InvalidInput, NoHealthyReplica, Overloaded
from inferkit.events import new_request_id

if TYPE_CHECKING:
    import threading

    from inferkit.batching.config import BatchConfig
    from inferkit.batching.counters import Counters
    from inferkit.batching.replicas import ReplicaSet

__all__ = ["Admission"]


class Admission:
    """Admission rules and request ids, over the state the batcher owns."""

    config: BatchConfig
    _lock: threading.Lock
    _set: ReplicaSet
    _closing: bool
    _counts: Counters

    if TYPE_CHECKING:  # provided by the batcher's other parts

        def _announcing(self) -> bool: ...

        def _refused(self, request: Request, error: BaseException) -> None: ...

    def key_by(self, key: Callable[[Inputs], Hashable] | None) -> None:
        """Key the requests that get queued by ``key(inputs)``: only equal keys batch together.

        ``None`` (the default): every request batches with every other (or by the keys requests
        were given). A request run alone on an idle replica is never keyed.
        """
        self._set.key = key

    def _keyed(self, request: Request) -> None:
        """Give a new ``request`` its batch key before it is queued (see ``key_by``); one it has is kept.

        A key that raises refuses the request: its ``RequestsFailed`` (it has its id, and its
        ``Submitted``: a trace span open) comes first, then the error goes on to its caller.
        """
        key = self._set.key
        if key is not None and request.key is None:
            try:  # a new request holds its inputs (no check: the try's cost instead, on the hot path)
                request.key = key(request.inputs)  # type: ignore[arg-type]
            except BaseException as error:
                self._refused(request, error)
                raise

    def next_id(self) -> int:
        """A fresh request id, unique across models and processes (see :func:`~inferkit.events.new_request_id`)."""
        return new_request_id(self._set.name)

    def reject(self, error: InferkitError) -> None:
        """Count a request refused before admission (e.g. ``InvalidInput``)."""
        with self._lock:
            self._counts.reject(error)

    def _refuse(self, request: Request, refusal: InferkitError) -> InferkitError:
        """Count a refusal decided under the lock and return it, to raise; its ``RequestsFailed`` is emitted first.

        The lock is released for that event (an observer may call ``stats()``) and taken again.
        """
        self._counts.reject(refusal)
        if self._announcing():
            self._lock.release()
            try:
                self._refused(request, refusal)
            finally:
                self._lock.acquire()
        return refusal

    def _admit(self, request: Request) -> tuple[int, int]:
        """The parts ``request`` takes and the rows of each; ``InvalidInput`` (counted) if no queue could hold it.

        Both come from one read of the config: a ``reconfigure`` meanwhile must not split the
        request into parts other than it was counted as.
        """
        config = self.config
        max_rows = config.call_rows
        count = 1 if request.rows <= max_rows else -(-request.rows // max_rows)
        nbytes = request.nbytes
        never = None
        # Before any work per part; one part always fits (``_most_parts`` is called for split requests only).
        if (count > 1 and count > _most_parts(config)) or nbytes > config.max_queue_bytes:
            never = self._never_fits(request, count)
        else:  # then what strings hold (only str and bytes get this far), walked no further than needed to refuse
            held = object_bytes(request.inputs, config.max_queue_bytes - nbytes)
            if held:
                nbytes = request.nbytes = nbytes + held
                if nbytes > config.max_queue_bytes:
                    never = self._never_fits(request, 1)
        if never is not None:
            self.reject(never)
            self._refused(request, never)
            raise never
        return count, max_rows

    def _never_fits(self, request: Request, parts: int) -> InvalidInput:
        """Why no queue could ever hold ``request`` (of ``parts`` parts)."""
        config = self.config
        most = _most_parts(config)
        if parts > most:
            return InvalidInput(
                f"request {request.id} has {request.rows} rows, {parts} batches of max_batch_size={config.call_rows}; "
                f"one request may take at most half of max_queue_size={config.max_queue_size} batches, so that it "
                f"never fills the queue for others (send at most {config.call_rows * most} rows per request)"
            )
        return InvalidInput(
            f"request {request.id} holds {request.nbytes} bytes of inputs, more than "
            f"max_queue_bytes={config.max_queue_bytes}; split it"
        )

    def _refusal(self, parts: int, nbytes: int, now: float) -> InferkitError | None:
        """Why the queue cannot take ``parts`` more parts holding ``nbytes`` now, if it cannot (under the lock)."""
        if self._closing:
            return Closed(f"predictor {self._set.name!r} is closed")
        limit = self.config.max_queue_size
        queued, held = self._set.queued()
        if queued + parts > limit:
            return Overloaded(queued, limit)
        if held + nbytes > self.config.max_queue_bytes:
            why = (
                f"queue is full: its requests hold {held} bytes of inputs and {nbytes} more would pass "
                f"max_queue_bytes={self.config.max_queue_bytes}"
            )
            return Overloaded(queued, limit, why)
        if not self._set.can_serve(now):
            return NoHealthyReplica(f"no healthy replica of {self._set.name!r}")
        return None


def _most_parts(config: BatchConfig) -> int:
    """The most batches one request may be split into: half the queue, so it never fills it for everyone else."""
    return max(1, config.max_queue_size // 2)
