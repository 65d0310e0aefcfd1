"""Replicas coming and going: retiring, ejection's consequences, hangs and replacements, resizing, closing.

A mixin of :class:`~inferkit.batching.batcher.Batcher`, kept apart so that each file reads in
one sitting; every method here runs under (or takes) the batcher's one lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from inferkit._timer import Timer
from inferkit.backends.base import Backend
from inferkit.batching.config import BatchConfig
from inferkit.batching.execute import Outcome
from inferkit.batching.lane import Batch, Lane
from inferkit.batching.replicas import ReplicaSet
from inferkit.batching.request import QUEUED, Request, notify_cancelled, settle_all
from inferkit.errors import Closed, ExecutionTimeout, InferkitError, NoHealthyReplica
from inferkit.events import Event, ReplicaReplaced
from inferkit.pool import PoolConfig, Replica, ReplicaState

__all__ = ["Lifecycle"]


class Lifecycle:
    """Replica lifecycle and shutdown, over the state the batcher owns."""

    config: BatchConfig
    pool: PoolConfig
    _clock: Callable[[], float]
    _lock: threading.Lock
    _drained: threading.Condition
    _set: ReplicaSet
    _timer: Timer
    _closing: bool
    _stopped: bool
    _running: dict[str, Batch]

    if TYPE_CHECKING:  # provided by the batcher and its other parts

        @property
        def name(self) -> str:
            """The model's name."""

        def _work(self, replica: Replica) -> None: ...

        def _fail(
            self, requests: list[Request], make_error: Callable[[Request], InferkitError], *, announce: bool = True
        ) -> None: ...

        def _tally(self, outcomes: list[Outcome]) -> list[Request]:
            raise NotImplementedError

        def _flush(self) -> None: ...

        def _event(self, event: Event) -> None: ...

        def _ended_unrun(self, requests: Iterable[Request], *, later: bool) -> None: ...

    # -- replica lifecycle -----------------------------------------------------------------

    def _retire(self, replica: Replica) -> None:
        """Drop a replica whose worker has stopped (under the lock) and free its model."""
        self._set.remove(replica, keep_lane=self._stopped)
        with contextlib.suppress(Exception):  # a failing close must not break the worker's cleanup
            replica.backend.close()
        self._drained.notify_all()

    def _after_ejection(self, replica: Replica) -> None:
        """Hand an ejected replica's work to the others, or fail it when no replica can serve it."""
        self._leave(replica)
        now = self._clock()
        if self._set.balancer is not None:
            others = self._set.other_lanes(replica.lane, now)
            if others:
                self._migrate(replica.lane, others)
                return
        if not self._set.usable(now) and not self._set.loading:
            self._fail_queued(lambda: NoHealthyReplica(f"no healthy replica of {self.name!r}"))

    def _leave(self, replica: Replica) -> None:
        """A replica stops taking work (ejected, draining, hung): it leaves its lane's idle ones.

        They are woken when work is queued: what was left to it (retries of what failed on them)
        is theirs now.
        """
        lane = replica.lane
        if replica in lane.idle:  # its worker, woken, sleeps out a cooldown or exits
            lane.idle.remove(replica)
            replica.cond.notify()
        if lane.count:
            lane.wake(len(lane.idle))

    def _migrate(self, lane: Lane, others: list[Lane]) -> None:
        """Move ``lane``'s queued requests to ``others`` (the balancer's pick for each); none: they stay."""
        if not others:
            return
        now = self._clock()
        entries = [e for e in lane.heap if e[2].state is QUEUED]
        lane.heap.clear()
        for _, _, req in entries:
            lane.unqueue(req)
            target = self._set.choose(others)
            target.push(req, now)
            target.wake()

    def _drop_lane(self, lane: Lane) -> None:
        """A lane whose replica is gone for good (no replacement), with a queue per replica: it goes.

        Its queue goes to the other lanes; left in place, it took requests no replica would run.
        """
        if self._set.balancer is None or lane.replicas or lane not in self._set.lanes:
            return
        others = [ln for ln in self._set.lanes if ln is not lane]
        self._migrate(lane, self._set.other_lanes(lane, self._clock()) or others)
        if lane.count:  # no other lane at all
            self._fail_queued(lambda: NoHealthyReplica(f"no healthy replica of {self.name!r}"))
        self._set.lanes.remove(lane)

    def _fail_queued(self, make_error: Callable[[], InferkitError]) -> None:
        """Settle every queued request with a fresh error (under the lock; delivered after it)."""
        queued = []
        for lane in self._set.lanes:
            for _, _, req in lane.heap:
                if req.state is QUEUED:
                    lane.unqueue(req)
                    if req.future is not None and req.parent is None and req.avoid is None:  # a retry's future runs
                        notify_cancelled(req.future)
                    queued.append(req)
            lane.heap.clear()
        self._fail(queued, lambda _: make_error())

    def _on_hang(self, batch: Batch, replica: Replica) -> None:
        """The watchdog: the model call outlived ``execution_timeout``; fail it and replace the replica."""
        if not batch.claim.acquire(blocking=False):
            return
        timeout = self.pool.execution_timeout
        outcomes: list[Outcome] = [
            (r, None, ExecutionTimeout(f"the model call holding request {r.id} ran past {timeout} s"))
            for r in batch.requests
        ]
        with self._lock:
            done = self._tally(outcomes)
            draining = replica.state is ReplicaState.DRAINING  # being removed: not replaced
            replica.state = ReplicaState.DEAD
            self._running.pop(replica.name, None)
            self._set.remove(replica, keep_lane=True)
            self._leave(replica)
            replace = not draining and self._wanted()
            if replace:
                self._set.loading += 1
                self._set.start(
                    threading.Thread(
                        target=self._replace, args=(replica,), name=f"inferkit-replace-{replica.name}", daemon=True
                    )
                )
            else:  # the others run what it left
                self._drop_lane(replica.lane)
            self._drained.notify_all()
        settle_all(done)
        self._event(ReplicaReplaced(self.name, replica.name, tuple(r.id for r in batch.requests), replace))

    def _wanted(self) -> bool:
        """Whether a hung replica's replacement should join (under the lock).

        While closing, only to run what is queued when no replica is left to: close() waits for it.
        """
        live = self._set.live()
        if self._closing:
            return not live and self._set.queued()[0] > 0
        return len(live) < self._set.target

    def _replace(self, dead: Replica) -> None:
        try:
            backend: Backend | None = self._set.factory()
        except Exception:  # noqa: BLE001 (a replacement that cannot load leaves the pool smaller)
            backend = None
        with self._lock:
            self._set.loading -= 1
            # Not added once a resize lowered the target meanwhile (closed after the lock), nor while
            # closing unless it alone can run what is queued.
            added = backend is not None and self._wanted()
            if backend is not None and added:
                self._set.add(backend, self._work, dead.lane if self._set.balancer is not None else None)
                dead.lane.wake()
            else:
                self._after_ejection(dead)
                self._drop_lane(dead.lane)
            self._drained.notify_all()  # close() may wait on what this settled
        if backend is not None and not added:
            backend.close()
        self._flush()

    def reconfigure(self, config: BatchConfig) -> None:
        """Change batching at run time; queued requests are batched under the new settings."""
        with self._lock:
            if self._closing:
                raise Closed(f"predictor {self.name!r} is closed")
            self.config = config
            for lane in self._set.lanes:
                lane.wake()

    def resize(self, replicas: int) -> None:
        """Grow or shrink the pool; a removed replica finishes what it holds and drains its queue.

        The last call sets the target (``ReplicaSet.target``): a load that finishes once the
        pool is at it is closed, not added (another resize's, or a hung replica's replacement),
        and shrinking drains live replicas only, never one for a replica not yet loaded.
        """
        if replicas < 1:
            msg = f"replicas must be >= 1, got {replicas}"
            raise ValueError(msg)
        with self._lock:
            if self._closing:
                raise Closed(f"predictor {self.name!r} is closed")
            self._set.target = replicas
            live = self._set.live()
            grow = max(0, replicas - len(live) - self._set.loading)  # a replica being loaded joins soon
            self._set.loading += grow  # so that a resize beside this one (or the autoscaler) counts them
        try:
            while grow:  # one at a time: each serves once loaded, and a close() stops the rest
                backend = self._set.factory()
                with self._lock:
                    grow -= 1
                    self._set.loading -= 1
                    if not self._closing and len(self._set.live()) < self._set.target:
                        self._set.add(backend, self._work)
                        continue
                    closing = self._closing
                backend.close()
                if closing:
                    raise Closed(f"predictor {self.name!r} was closed while it grew")
                return  # a later resize lowered the target meanwhile
        finally:
            if grow:
                with self._lock:
                    self._set.loading -= grow
        with self._lock:
            live = self._set.live()
            extra = len(live) - self._set.target
            # Remove ejected, then idle, then busy replicas (never a busy one before an idle one).
            order = sorted(live, key=lambda r: (r.state is not ReplicaState.EJECTED, r.busy, r.running_rows))
            for replica in order[: max(0, extra)]:
                replica.state = ReplicaState.DRAINING
                if self._set.balancer is not None:
                    self._migrate(replica.lane, self._set.other_lanes(replica.lane, self._clock()))
                self._leave(replica)
                replica.cond.notify()

    # -- closing -----------------------------------------------------------------------------

    def owns_thread(self) -> bool:
        """Whether the calling thread is one of this batcher's own (a worker, a loader, the timer).

        Such a thread runs done-callbacks, and close() waits for it.
        """
        me = threading.current_thread()
        with self._lock:
            return me in self._set.threads or self._timer.runs_here()

    def stop_taking(self) -> None:
        """Refuse new requests from now on (``close`` does the rest)."""
        with self._lock:
            self._closing = True

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let queued and running ones finish, then stop every thread.

        Returns within ``timeout``: what is still queued or running then ends in ``Closed`` (a
        model call that never returns keeps its daemon thread).
        """
        end = None if timeout is None else self._clock() + timeout
        with self._lock:
            self._closing = True
            for lane in self._set.lanes:
                for replica in lane.idle:
                    replica.cond.notify()
            while self._set.queued()[0] or self._running:
                left = None if end is None else end - self._clock()
                if left is not None and left <= 0:
                    break
                self._drained.wait(left)
            self._fail_queued(lambda: Closed(f"predictor {self.name!r} closed before the request ran"))
            self._stopped = True
            for replica in list(self._set.all):
                replica.cond.notify_all()
            threads = [r.thread for r in self._set.all if r.thread is not None]
            threads += [t for t in self._set.threads if t.name.startswith("inferkit-replace")]
        self._flush()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(None if end is None else max(0.0, end - self._clock()))
        self._abandon_running()
        self._timer.close(None if end is None else max(0.0, end - self._clock()))

    def _abandon_running(self) -> None:
        """Settle with ``Closed`` what still runs on workers that did not stop in time."""
        with self._lock:
            batches = list(self._running.values())
        for batch in batches:
            if batch.claim.acquire(blocking=False):
                outcomes: list[Outcome] = [
                    (r, None, Closed(f"predictor {self.name!r} closed while request {r.id} ran"))
                    for r in batch.requests
                ]
                with self._lock:
                    done = self._tally(outcomes)
                settle_all(done)
                self._ended_unrun(done, later=False)
