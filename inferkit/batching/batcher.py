"""The batcher: queueing, the worker loop, and what happens when a batch ends.

Locking rule: one lock per batcher guards every lane, replica and counter. It is held for
microseconds at a time, never across a model call, a backend load or the settling of a
caller's future: outcomes decided under the lock are collected and delivered after it
(``_settle_later`` for what other threads decide, a worker's ``done`` list for its own batch).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from inferkit._timer import Timer
from inferkit.backends.base import BackendFactory, on_caller_thread
from inferkit.batching import assembly
from inferkit.batching.admission import Admission
from inferkit.batching.caller import CallerThread
from inferkit.batching.config import BatchConfig
from inferkit.batching.counters import Counters
from inferkit.batching.deadlines import Deadlines, expired
from inferkit.batching.execute import Outcome, Ran, model_error, run_batch, try_join
from inferkit.batching.failures import Failures
from inferkit.batching.lane import Batch, Lane
from inferkit.batching.lifecycle import Lifecycle
from inferkit.batching.replicas import ReplicaSet
from inferkit.batching.reporting import Events, Reporting
from inferkit.batching.request import DONE, Announcement, Inputs, Request, Settled, add_waiter, settle_all
from inferkit.errors import InferkitError
from inferkit.events import Event, RequestsExpired
from inferkit.pool import PoolConfig, Replica, ReplicaState

__all__ = ["Batcher"]

_Result = tuple[list[Outcome], bool, float, float]  # outcomes, replica fault, when the call ended, its time


class Batcher(Admission, CallerThread, Deadlines, Failures, Reporting, Lifecycle):
    """Queues requests and runs them in batches on a pool of replicas. Thread-safe.

    The hot path is here: queueing, batch formation, the worker loop and the accounting of a
    finished batch. Admission rules (:class:`~inferkit.batching.admission.Admission`), a
    synchronous caller's path (:class:`~inferkit.batching.caller.CallerThread`),
    cancellation and deadlines (:class:`~inferkit.batching.deadlines.Deadlines`),
    what a failure means (:class:`~inferkit.batching.failures.Failures`), events and read-only
    views (:class:`~inferkit.batching.reporting.Reporting`) and the replicas' lives and closing
    (:class:`~inferkit.batching.lifecycle.Lifecycle`) are its parts in their own modules.
    """

    _clock: Callable[[], float] = staticmethod(time.monotonic)  # the one clock of queues, health and watchdogs

    def __init__(
        self,
        factory: BackendFactory,
        batching: BatchConfig,
        pool: PoolConfig,
        *,
        name: str = "model",
        emit: Callable[[Event], None] | None = None,
        verbose: Callable[[], bool] = lambda: True,
        timer: Timer | None = None,
    ) -> None:
        """Load ``pool.replicas`` backends from ``factory`` and start their workers.

        ``emit`` receives the batcher's events (``verbose()``: whether per-batch ones are wanted
        too); ``timer`` runs deadlines and watchdogs (default: one of its own, closed with it).
        """
        self.config = batching
        self.pool = pool
        self._events = Events(emit, verbose)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._set = ReplicaSet(name, factory, pool.balancer(), self._lock)
        self._timer = timer if timer is not None else Timer(f"inferkit-{name}-timer")
        self._closing = False
        self._stopped = False
        self._settle_later: list[Settled] = []  # settled under the lock by another thread, delivered after it
        self._running: dict[str, Batch] = {}  # by replica name
        self._counts = Counters()
        self._set.target = pool.replicas
        try:
            for _ in range(pool.replicas):
                self._set.add(factory(), self._work)
        except BaseException:  # the replicas loaded so far: their workers stop and their backends close
            self.close()
            raise

    @property
    def name(self) -> str:
        """The model's name, in events, errors and thread names."""
        return self._set.name

    # -- queueing ------------------------------------------------------------------------

    def put(self, request: Request) -> None:
        """Queue ``request`` (split into parts when it has more rows than a batch).

        Raises ``InvalidInput`` (a request no queue could ever hold), ``Closed``, ``Overloaded``
        or ``NoHealthyReplica`` without queueing anything.
        """
        count, max_rows = self._admit(request)
        self._queue(request, count, max_rows, caller=False)

    def _queue(self, request: Request, count: int, max_rows: int, *, caller: bool) -> tuple[Batch, Replica] | None:
        """Queue ``request``, admitted (``_admit``) as ``count`` parts of ``max_rows``, or refuse it (``Closed``, ...).

        For a synchronous ``caller`` (:meth:`call`) the request gets a waiter and, when a replica
        is idle and a batch should go now, that batch and replica are returned, already claimed,
        for the caller to run on its thread.
        """
        inline = caller and count == 1 and self.pool.execution_timeout is None  # no watchdog on a caller's thread
        self._keyed(request)  # outside the lock
        if count == 1:
            parts = [request]
        else:
            chunks = min(count, len(self._set.lanes)) if self._set.balancer is not None else 1
            parts = assembly.split(request, max_rows, count, chunks)
        with self._lock:
            now = self._clock()
            refusal = self._refusal(count, request.nbytes, now)
            if refusal is not None:
                raise self._refuse(request, refusal)
            self._counts.accepted += 1
            if caller:
                add_waiter(request)  # before a worker can take it
            if request.future is not None:
                top = request
                request.future._on_cancel = lambda: self.cancel(top)
            for part in parts:
                lane = self._set.lane_for(now, self.config.full_rows)
                lane.push(part, now)
                if part is not parts[-1]:
                    lane.wake(part.parts_n)  # parts may run on several replicas at once
            if inline and lane.idle:
                replica = lane.idle[-1]
                formed, _ = self._form(lane, replica, now)
                if formed is not None:
                    lane.idle.pop()
                    self._start(replica, formed)
                    request.relay = request  # its caller runs ``formed`` first: never hold up a relay
                    return formed, replica
            lane.wake(parts[-1].parts_n)
            later = self._settle_later
            if later:  # this thread delivers them, user callbacks and all, before it waits
                self._settle_later = []
                if caller:
                    request.relay = request  # so it is never in a relay meanwhile
        if later:
            settle_all(later)
        return None

    def _flush(self) -> None:
        """Deliver what other threads settled under the lock (expired, failed on ejection)."""
        with self._lock:
            done, self._settle_later = self._settle_later, []
        settle_all(done)

    # -- batches ---------------------------------------------------------------------------

    def _form(self, lane: Lane, replica: Replica, now: float) -> tuple[Batch | None, float | None]:
        """``lane.form`` plus what it cleared: expired requests settled later, cancellations counted."""
        formed = lane.form(replica, now, self.config, crowded=self._set.crowded(replica))
        if formed.cancelled:
            self._counts.cancelled += len(formed.cancelled)
            self._drained.notify_all()
            self._cancelled(formed.cancelled, later=True)
        if formed.expired:
            self._fail(formed.expired, expired, announce=False)
            self._event_later(RequestsExpired(self.name, tuple(r.id for r in formed.expired)))
        return formed.batch, formed.wait

    def _fail(
        self, requests: list[Request], make_error: Callable[[Request], InferkitError], *, announce: bool = True
    ) -> None:
        """Settle requests taken off the queue with an error each (under the lock; delivered after it).

        ``announce``: with their ``RequestsFailed`` (else the caller emits an event of its own).
        """
        done = self._tally([(r, None, make_error(r)) for r in requests])
        self._settle_later.extend(done)
        if announce:
            self._ended_unrun(done, later=True)

    def _start(self, replica: Replica, batch: Batch) -> None:
        replica.busy = True
        replica.running_rows = batch.rows
        self._running[replica.name] = batch

    def _execute(self, batch: Batch, replica: Replica, inputs: Inputs | None = None) -> _Result | None:
        """Run ``batch`` on ``replica`` (no lock held); None when the watchdog settled it first.

        ``inputs``: the batch's inputs when the worker joined them already.
        """
        timeout = self.pool.execution_timeout
        start = self._clock()
        watchdog = None
        if timeout is not None:
            watchdog = self._timer.schedule(start + timeout, lambda: self._on_hang(batch, replica))
        ran = run_batch(batch.requests, replica.backend, inputs)
        end = self._clock()
        if watchdog is not None:
            self._timer.cancel(watchdog)  # it holds the batch, arrays and all
        return self._executed(batch, replica, ran, start, end)

    def _executed(self, batch: Batch, replica: Replica, ran: Ran, start: float, end: float) -> _Result | None:
        """A batch run from ``start`` to ``end``, claimed and reported; None if the watchdog or close() took it."""
        outcomes, failed, fault = ran
        if not batch.claim.acquire(False):  # noqa: FBT003 (a keyword costs a parse per batch)
            return None
        if failed:
            batch.plain = False
        if self._events.emit is not None:
            self._report(batch, replica, end - start, failed)
        return outcomes, fault, end, end - start

    def _report(self, batch: Batch, replica: Replica, spent: float, failed: list[Outcome]) -> None:
        """The events of a batch that ran for ``spent`` seconds (a failed one's ``BatchDone``: ``_account``'s)."""
        if failed:
            self._failures(failed)
        elif self._events.verbose():
            self._event(self._batch_done(batch, replica, spent))

    def _finish(self, batch: Batch, replica: Replica, result: _Result | None) -> list[Settled]:
        """Count a batch's outcomes and free its replica (under the lock); return what to settle.

        Never raises: after a bug of inferkit's own the batch's requests are still answered and
        the replica freed (``_salvage``).
        """
        done: list[Settled] = []
        try:
            self._account(batch, replica, result, done)
        except Exception as bug:  # noqa: BLE001 (never leave a request unanswered or a replica gone)
            done += self._salvage(batch, replica, bug, done)
        return done

    def _account(self, batch: Batch, replica: Replica, result: _Result | None, done: list[Settled]) -> None:
        """``_finish``'s work; what it settles goes into ``done`` as it goes."""
        if result is None:  # the watchdog took over; the replica is gone
            return
        outcomes, fault, now, spent = result
        blamed: list[Replica] = []
        if batch.plain and not fault:  # nothing to retry, blame or assemble
            latencies = self._succeeded(batch, outcomes, now, done)
            worked = True
        else:
            final: list[Outcome] = []
            failed: list[int] = []
            retried: list[int] = []
            worked = False
            for req, value, failure in outcomes:
                error = failure
                if error is None:
                    worked = True
                    if req.blame and req.avoid is not None and req.avoid is not replica:  # another replica's fault
                        blamed.append(req.avoid)
                else:
                    failed.append(req.id)
                    if self._retry(req, replica, error, fault=fault, now=now):
                        retried.append(req.id)
                        continue
                    if fault:
                        error = model_error(req, error)
                final.append((req, value, error))
            if failed and (emit := self._events.emit) is not None and self._events.verbose():
                # Once retries are decided; emitted before its callers are answered.
                done.append(Announcement(emit, self._batch_done(batch, replica, spent, failed, retried)))
            done += self._tally(final)
            latencies = [now - r.t0 for r, _, _ in final]
        self._book(batch, replica, latencies, spent)
        # A request's own failure says nothing of the replica; only a fault, or a failure that
        # another replica did not repeat, counts against it.
        # (A success only resets the failure count and ends an ejection: else it changes nothing.)
        if fault or (worked and (replica.consecutive_failures or replica.state is ReplicaState.EJECTED)):
            self._health(replica, ok=not fault, now=now)
        for bad in blamed:  # unless ejected since: what failed before the ejection is no failed probe
            if bad in self._set.all and (bad.state is not ReplicaState.EJECTED or now >= bad.ejected_until):
                self._health(bad, ok=False, now=now)
        self._release(replica)

    def _succeeded(self, batch: Batch, outcomes: list[Outcome], now: float, done: list[Settled]) -> list[float]:
        """``_tally`` for a plain batch that succeeded, in one pass; its requests' latencies."""
        latencies = []
        for req, value, _ in outcomes:
            req.state = DONE
            req.value = value
            latencies.append(now - req.t0)
        done += batch.requests  # the outcomes' requests, in order
        self._counts.completed += len(latencies)
        if self._closing:
            self._drained.notify_all()
        return latencies

    def _book(self, batch: Batch, replica: Replica, latencies: list[float], spent: float) -> None:
        """Count a finished batch that ended requests of ``latencies`` seconds and took ``spent`` (under the lock)."""
        self._counts.batch(batch.rows, batch.reason, sum(latencies), spent)
        replica.batches += 1
        replica.requests += len(batch.requests)
        replica.record_latencies(latencies)

    def _release(self, replica: Replica) -> None:
        """A replica's batch is over (under the lock)."""
        self._running.pop(replica.name, None)
        replica.busy = False
        replica.running_rows = 0
        if self._closing:
            self._drained.notify_all()

    def _tally(self, outcomes: list[Outcome]) -> list[Request]:
        """File outcomes (parts into their request); count and return the requests now settled."""
        done = []
        completed = 0
        for req, value, error in outcomes:
            req.state = DONE
            if req.parent is None:
                req.value, req.error = value, error
                top = req
            else:
                whole = assembly.complete(req, value, error)
                if whole is None:
                    continue
                top = whole
            if top.error is None:
                completed += 1  # counted once per batch: no call per request
            else:
                self._counts.ended(top.error)
            done.append(top)
        self._counts.completed += completed
        if self._closing:
            self._drained.notify_all()
        return done

    # -- workers ---------------------------------------------------------------------------

    def _work(self, replica: Replica) -> None:
        on_caller_thread(worker=True)
        lane: Lane = replica.lane
        done: list[Settled] = []  # settled by this worker, delivered once the lock is released
        self._lock.acquire()
        try:
            while True:
                if self._settle_later:
                    done.extend(self._settle_later)
                    self._settle_later = []
                state = replica.state
                if state is ReplicaState.DEAD or (self._stopped and not replica.busy):
                    break
                now = self._clock()
                drained = state is ReplicaState.DRAINING and (self._set.balancer is None or lane.count == 0)
                if replica.busy or drained:
                    batch, wait = None, None
                elif state is ReplicaState.DRAINING or replica.usable(now):
                    batch, wait = self._form(lane, replica, now)
                else:
                    batch, wait = None, replica.ejected_until - now
                if batch is None:
                    if done or self._settle_later:  # deliver before sleeping (or stopping)
                        done.extend(self._settle_later)
                        self._settle_later = []
                        self._lock.release()
                        settle_all(done)
                        done = []
                        self._lock.acquire()
                        continue
                    if replica.busy:  # lent to a caller's thread
                        replica.cond.wait()
                        continue
                    if drained:
                        break
                    # Waiting (a delay at most) for the busy replicas' cores, not for arrivals:
                    # arrivals need not wake it. With no delay to wait, what is queued is only
                    # what it must leave to another replica (a retry): it waits idle, to be woken.
                    parked = wait is not None and lane.count > 0 and self._set.crowded(replica)
                    if replica.usable(now) and replica not in lane.idle and not parked:
                        lane.idle.append(replica)
                    # A cooldown or delay past what a lock's timeout takes (1e10 s) would raise, ending the worker.
                    replica.cond.wait(None if wait is None else min(wait, threading.TIMEOUT_MAX))
                    if replica in lane.idle and not replica.busy:
                        lane.idle.remove(replica)
                    continue
                # The next batch is claimed and joined before the last one's callers are woken:
                # the model starts again without waiting for them (woken, they take the GIL).
                self._start(replica, batch)
                self._lock.release()
                try:
                    inputs = None
                    if done:
                        inputs = try_join(batch.requests)
                        settle_all(done)
                        done = []
                    result = self._execute(batch, replica, inputs)
                    inputs = None  # not kept alive while the worker idles
                finally:
                    self._lock.acquire()
                if result is None:  # the watchdog gave up on this call and replaced the replica
                    break
                done = self._finish(batch, replica, result)
                result = None  # its outcomes (inputs and outputs) are not kept while the worker idles
        finally:
            if replica in lane.idle:
                lane.idle.remove(replica)
            if replica.state is not ReplicaState.DEAD or not replica.busy:
                self._retire(replica)
            done.extend(self._settle_later)
            self._settle_later = []
            self._lock.release()
            settle_all(done)
