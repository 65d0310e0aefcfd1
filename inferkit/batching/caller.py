"""A synchronous caller's path: its request run on its own thread when a replica is idle.

``call`` owns it end to end: admission, then either a replica claimed for the request alone
(nothing queued or running: no queue to pass, no hand-off between threads), or the queue and a
wait for the worker; a caller that finds a batch due and a replica idle runs that batch itself.
A mixin of :class:`~inferkit.batching.batcher.Batcher`, under the batcher's locking rule.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from inferkit.batching.execute import interrupts, lone_failure, run_one
from inferkit.batching.lane import Batch
from inferkit.batching.request import DONE, RUNNING, Request, add_waiter, settle_all
from inferkit.errors import InferkitError
from inferkit.pool import LATENCY_WINDOW, ReplicaState

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from inferkit.batching.counters import Counters
    from inferkit.batching.execute import Outcome, Ran
    from inferkit.batching.replicas import ReplicaSet
    from inferkit.batching.reporting import Events
    from inferkit.batching.request import Settled
    from inferkit.pool import PoolConfig, Replica

    _Result = tuple[list[Outcome], bool, float, float]

__all__ = ["CallerThread"]

_HEALTHY = ReplicaState.HEALTHY  # a global load, not an attribute lookup, per request


class CallerThread:
    """``call`` and the batches a caller's thread runs, over the state the batcher owns.

    The lone path's two turns under the lock (claim, book) make no Python call: CPython hands
    the GIL to another thread only where it checks for a switch (a call, a function's start, a
    loop's end), so a caller there is never switched out holding the lock. One that is makes
    every other caller block on the lock and then take it, and the GIL, in turn: with 32 callers
    of a no-op model, 5x the context switches and about a third more CPU per request.
    """

    _lock: threading.Lock
    _set: ReplicaSet
    pool: PoolConfig
    _closing: bool
    _running: dict[str, Batch]
    _counts: Counters
    _events: Events
    _settle_later: list[Settled]
    _clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by the batcher

        def _admit(self, request: Request) -> tuple[int, int]: ...

        def _queue(
            self, request: Request, count: int, max_rows: int, *, caller: bool
        ) -> tuple[Batch, Replica] | None: ...

        def withdraw(self, request: Request) -> bool:
            """Fail ``request`` with ``DeadlineExceeded`` if none of it has started; whether it was."""

        def _start(self, replica: Replica, batch: Batch) -> None: ...

        def _execute(self, batch: Batch, replica: Replica) -> _Result | None: ...

        def _executed(self, batch: Batch, replica: Replica, ran: Ran, start: float, end: float) -> _Result | None: ...

        def _report(self, batch: Batch, replica: Replica, spent: float, failed: list[Outcome]) -> None: ...

        def _finish(self, batch: Batch, replica: Replica, result: _Result | None) -> list[Settled]: ...

        def _release(self, replica: Replica) -> None: ...

        def _salvage(
            self, batch: Batch, replica: Replica, bug: Exception, done: Sequence[Settled]
        ) -> list[Request]: ...

        def _flush(self) -> None: ...

    def call(self, request: Request) -> Any:
        """Run ``request`` for a synchronous caller and return its result (or raise its error).

        The fast path: when a replica is idle and nothing is queued or running, the caller's own
        thread runs the request alone (:meth:`_run_alone`); when a replica is idle and a batch is
        due, it runs that batch. Past its deadline a request still queued is withdrawn.
        """
        count, max_rows = self._admit(request)
        if count != 1 or self._running or not self._run_alone(request):  # ``_running``: read again under the lock
            claimed = self._queue(request, count, max_rows, caller=True)
            if claimed is not None:
                self.run_inline(*claimed)
        waiter = request.waiter
        if waiter is not None:  # else answered on this thread
            deadline = request.deadline
            if deadline is None:
                waiter.acquire()
            elif not waiter.acquire(timeout=min(max(deadline - time.monotonic(), 0.0), threading.TIMEOUT_MAX)):
                if self.withdraw(request):  # never settled, so in no relay
                    raise request.error  # type: ignore[misc]
                waiter.acquire()  # it started before its deadline: it finishes
            # Woken, so settled: pass the relay on to the next caller (``settle_all``), or it was
            # woken directly. Not in a ``finally``: a caller interrupted in its wait keeps its
            # request's direct mark (a main-thread one), for the settling thread to see.
            relay, request.relay = request.relay, None
            if relay is not None and relay is not request:
                relay.waiter.release()  # type: ignore[union-attr]
        if request.error is not None:
            raise request.error
        return request.value

    def _run_alone(self, request: Request) -> bool:
        """Run ``request`` alone on its caller's thread if a healthy replica is idle and nothing is queued or running.

        Whether it did; if not, nothing changed. The lone path in one function: no queue, no
        hand-off between threads, no lists. Nothing could refuse the request: its bytes fit
        (``_admit``), nothing is queued and the replica is healthy; it passes no one. A success
        on a healthy replica is booked here; anything else (a failure, a replica ejected or
        drained meanwhile, closing) goes the general way, and a request not answered by it
        (retried elsewhere, or being answered by ``close()``) gets a waiter.
        """
        if self._set.balancer is not None or self.pool.execution_timeout is not None:
            return False  # a queue per replica, or a watchdog that a caller's thread could not have
        batch = Batch([request], request.rows, "idle")  # built before the lock: less Python under it
        lane = self._set.lanes[0]
        arrived = request.t0
        with self._lock:  # no calls under it (see the class docstring)
            idle = lane.idle
            if self._closing or self._running or lane.count or not idle or idle[-1].state is not _HEALTHY:
                return False
            self._counts.accepted += 1
            last = lane.last_arrival  # ``Lane.arrived``; an arrival older than the last counted
            if arrived > last:  # (its caller was slow to reach the lock) changes nothing
                if last:
                    lane.gap += 0.1 * (arrived - last - lane.gap)
                lane.last_arrival = arrived
            replica = idle[-1]
            del idle[-1]
            request.state = RUNNING
            replica.busy = True  # ``_start``
            replica.running_rows = request.rows
            self._running[replica.name] = batch
        start = self._clock()
        try:
            value = run_one(request, replica.backend)
        except BaseException as exc:  # run_batch's verdicts, for a lone request
            if interrupts(exc):
                self._interrupted(batch, replica, exc, request)
                raise
            outcome, fault = lone_failure(request, exc)
            end = self._clock()
            result = self._executed(batch, replica, ([outcome], [outcome], fault), start, end)
            self._finish_inline(batch, replica, result, request)
            return True
        end = self._clock()
        if not batch.claim.acquire(False):  # noqa: FBT003 (close() gave up on it and answers it)
            self._finish_inline(batch, replica, None, request)
            return True
        if self._events.emit is not None and self._events.verbose():
            self._report(batch, replica, end - start, [])
        latency = end - arrived
        with self._lock:  # no calls under it unless work was queued meanwhile
            booked = not self._closing and not replica.consecutive_failures and replica.state is _HEALTHY
            if booked:
                request.state = DONE
                request.value = value
                counts = self._counts
                counts.completed += 1
                try:
                    counts.batches += 1  # ``Counters.batch``
                    counts.rows += batch.rows
                    counts.sizes[batch.rows] += 1
                    counts.reasons["idle"] += 1
                    counts.request_seconds += latency
                    counts.compute_seconds += end - start
                    replica.batches += 1  # ``Replica.record_latencies`` for one
                    replica.requests += 1
                    n = replica.latency_count
                    replica.latencies[n % LATENCY_WINDOW] = latency
                    replica.latency_count = n + 1
                except Exception as bug:  # noqa: BLE001 (as in ``_finish``: the request is answered)
                    self._salvage(batch, replica, bug, [request])
                running = self._running  # ``_release`` and ``_hand_back``, for a healthy replica and no close()
                if replica.name in running:
                    del running[replica.name]
                replica.busy = False
                replica.running_rows = 0
                if lane.count:
                    replica.cond.notify()  # its worker takes over the queue
                elif replica not in idle:
                    idle.append(replica)
        if not booked:
            self._finish_inline(batch, replica, ([(request, value, None)], False, end, end - start), request)
        elif self._settle_later:
            self._flush()
        return True

    def run_inline(self, batch: Batch, replica: Replica) -> None:
        """Run a batch claimed by :meth:`_queue` on the caller's thread, then free the replica."""
        try:
            result = self._execute(batch, replica)
        except BaseException as exc:  # Ctrl-C out of the model (``run_batch`` keeps the rest): no caller left waiting
            self._interrupted(batch, replica, exc)
            raise
        self._finish_inline(batch, replica, result)

    def _interrupted(self, batch: Batch, replica: Replica, exc: BaseException, alone: Request | None = None) -> None:
        """Fail a batch whose model call on a caller's thread raised ``exc`` (no ``Exception``) and free the replica.

        A ``KeyboardInterrupt`` on the main thread (:func:`~inferkit.batching.execute.interrupts`) is
        the caller's, not the model's: it goes on to the caller; the batch's requests fail (never
        retried: the caller is gone), its other callers are answered, and the replica serves again.
        """
        now = self._clock()
        why = f"the call was interrupted on its caller's thread ({type(exc).__name__})"
        failed: list[Outcome] = [(r, None, InferkitError(f"request {r.id}: {why}")) for r in batch.requests]
        # Told as failed (its BatchDone names them: their spans end in error), with no fault: no
        # verdict on the replica's health (a failure is no success either), no retry, no ModelFailed.
        self._finish_inline(batch, replica, self._executed(batch, replica, (failed, failed, False), now, now), alone)

    def _finish_inline(
        self, batch: Batch, replica: Replica, result: _Result | None, alone: Request | None = None
    ) -> None:
        """Account a batch a caller's thread ran and hand the replica back to its worker.

        ``alone``: the request :meth:`_run_alone` ran, given a waiter if it is not answered yet.
        """
        with self._lock:
            if result is None:  # close() gave up on it and answered it (no watchdog runs inline): free the replica
                self._release(replica)
            done = self._finish(batch, replica, result)
            self._hand_back(replica)
            if alone is not None and alone.state is not DONE:  # settled after the lock: it reads the waiter then
                add_waiter(alone, direct=True)  # its caller settles ``done`` first
        settle_all(done)
        if self._settle_later:
            self._flush()

    def _hand_back(self, replica: Replica) -> None:
        """A replica a caller's thread ran a batch on, back to its worker (under the lock)."""
        lane = replica.lane
        if lane.count or self._closing or (replica.state is not _HEALTHY and not replica.usable(self._clock())):
            replica.cond.notify()  # its worker takes over: work is queued, or a cooldown to time
        elif replica not in lane.idle:
            lane.idle.append(replica)
