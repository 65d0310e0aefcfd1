"""The dynamic batcher: bounded queues, batch formation, and running batches on replicas.

Requests wait in a priority queue (a *lane*). With the default shared balancing there is one
lane and every free replica pulls its next batch from it, the way Triton, TorchServe and TF
Serving schedule in-process; with a :class:`~inferkit.pool.Balancer` each replica has a lane
of its own and the balancer picks one per request.

A free replica takes a batch at once when it is full, when the oldest queued request has
waited ``max_delay_ms``, or when waiting could not grow it: no other replica of the lane is
busy (so nothing is in flight that could come back as new requests), or requests have stopped
arriving. ``max_delay_ms`` is the longest a request waits for companions, never a fixed wait.

Thread hand-offs cost far more than the work of batching, so a synchronous caller that finds
a replica idle runs its batch on its own thread, and a replica's worker that finishes a batch
forms and runs the next one itself. A model call that raises is retried on halves of the batch
until the failing requests are found, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

import attrs
import numpy as np

from inferkit._timer import Timer
from inferkit._validators import integer, number
from inferkit.backends.base import Backend, BackendFactory, ReplicaFault
from inferkit.errors import (
    Closed,
    DeadlineExceeded,
    ExecutionTimeout,
    InferkitError,
    InvalidInput,
    ModelError,
    NoHealthyReplica,
    Overloaded,
)
from inferkit.events import BatchDone, Event, ReplicaEjected, ReplicaReplaced, RequestsExpired
from inferkit.pool import LIVE_STATES, Balancer, PoolConfig, Replica, ReplicaState, record_batch
from inferkit.stats import ReplicaStats, Stats

__all__ = ["BatchConfig", "Batcher", "Request", "RequestFuture"]

Array = np.ndarray[Any, Any]
Inputs = Mapping[str, Array]

_QUEUED, _RUNNING, _DONE = 0, 1, 2
_MAX_SKIPPED = 64  # queued requests of other shapes looked past while filling one batch


@attrs.frozen
class BatchConfig:
    """How requests are grouped into batches.

    ==================  ===================================================================
    ``max_batch_size``  rows per batch (>= 1); a request with more rows is split and
                        reassembled
    ``max_delay_ms``    the longest a request waits for companions (>= 0), never a fixed wait
    ``max_queue_size``  requests that may wait; one more raises ``Overloaded`` at once
    ==================  ===================================================================
    """

    max_batch_size: int = attrs.field(default=64, validator=integer(1))
    max_delay_ms: float = attrs.field(default=2.0, validator=number(0))
    max_queue_size: int = attrs.field(default=4096, validator=integer(1))


class RequestFuture(Future[Any]):
    """A :class:`concurrent.futures.Future` for one request; ``request_id`` names it in events.

    Cancelling it while the request is queued means the request never runs.
    """

    def __init__(self, request_id: int) -> None:
        super().__init__()
        self.request_id = request_id
        self._on_cancel: Callable[[], None] | None = None

    def cancel(self) -> bool:
        """Cancel the request if it has not started; return whether it was cancelled."""
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel()
        notify_cancelled(self)
        return True


def notify_cancelled(future: Future[Any]) -> bool:
    """Move ``future`` to RUNNING, or tell ``wait()``/``as_completed()`` it was cancelled; whether it runs.

    Both the canceller and the batcher call this, in either order: the second finds the
    cancellation already announced (a RuntimeError from the stdlib), which is the same answer.
    """
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # already announced
        return False


class Request:
    """One accepted request, or one part of a request split to fit ``max_batch_size``."""

    __slots__ = (
        "__weakref__",
        "avoid",
        "blame",
        "deadline",
        "error",
        "expiry",
        "future",
        "id",
        "index",
        "inputs",
        "key",
        "lane",
        "parent",
        "part_rows",
        "parts",
        "parts_left",
        "parts_n",
        "priority",
        "rows",
        "state",
        "t0",
        "value",
        "waiter",
    )

    def __init__(
        self,
        request_id: int,
        inputs: Inputs | None,
        rows: int,
        key: Hashable,
        priority: int,
        deadline: float | None,
        t0: float,
    ) -> None:
        self.id = request_id
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.priority = priority
        self.deadline = deadline
        self.t0 = t0
        self.state = _QUEUED
        self.lane: _Lane | None = None
        self.future: RequestFuture | None = None
        self.waiter: threading.Lock | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.parent: Request | None = None
        self.index = 0  # a part's place in its parent's result (a chunk's: its next part's)
        self.parts: list[Request] = []  # a split request's chunks
        self.parts_left = 0  # parts not yet done; -1 once a split request is settled
        # A chunk is a queued run of parts of one split request, carved a part at a time as
        # batches form, so a request's size never costs work before it runs.
        self.parts_n = 1
        self.part_rows = rows
        self.avoid: Replica | None = None  # the replica it failed on; it is retried elsewhere once
        self.blame = False  # whether success elsewhere is a fault of ``avoid`` (not yet counted)
        self.expiry: tuple[Timer, list[object]] | None = None  # its deadline's timer entry

    def settle(self) -> None:
        """Deliver ``value`` or ``error`` to whoever waits (called once, outside any lock)."""
        if self.expiry is not None:
            timer, entry = self.expiry
            self.expiry = None
            timer.cancel(entry)
        fut = self.future
        if fut is not None:
            fut._on_cancel = None  # break the request <-> future cycle so the GC never has to
            try:
                if self.error is None:
                    fut.set_result(self.value)
                else:
                    fut.set_exception(self.error)
            except InvalidStateError:  # cancelled by the caller meanwhile
                pass
        elif self.waiter is not None:
            self.waiter.release()


class _Lane:
    """A priority queue of requests served by one or more replicas."""

    __slots__ = ("count", "gap", "heap", "idle", "last_arrival", "replicas", "rows", "since")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, Request]] = []
        self.count = 0  # live queued requests (the heap may hold settled ones, skipped lazily)
        self.rows = 0
        self.since = 0.0  # arrival of the oldest queued request (FIFO head)
        self.last_arrival = 0.0
        self.gap = 0.0  # smoothed time between arrivals
        self.replicas: list[Replica] = []
        self.idle: list[Replica] = []  # replicas whose worker waits for work

    def load(self) -> int:
        return self.rows + sum(r.running_rows for r in self.replicas)


class _Batch:
    __slots__ = ("claim", "reason", "requests", "rows")

    def __init__(self, requests: list[Request], rows: int, reason: str) -> None:
        self.requests = requests
        self.rows = rows
        self.reason = reason
        # Exactly one of the worker and the execution-timeout watchdog settles the batch.
        self.claim = threading.Lock()


_Outcome = tuple[Request, Any, BaseException | None]
_Result = tuple[list[_Outcome], bool, float, float]  # outcomes, replica fault, when the call ended, its time


class Batcher:
    """Queues requests and runs them in batches on a pool of replicas.

    Thread-safe. All shared state is guarded by one lock, held for microseconds at a time and
    never across a model call or while a caller's future is being settled.
    """

    def __init__(
        self,
        factory: BackendFactory,
        batching: BatchConfig,
        pool: PoolConfig,
        *,
        name: str = "model",
        emit: Callable[[Event], None] | None = None,
        verbose: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._verbose = verbose
        self.config = batching
        self.pool = pool
        self._factory = factory
        self._emit = emit
        self._clock = clock
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._balancer: Balancer | None = pool.balancer()
        self._lanes: list[_Lane] = [] if self._balancer is not None else [_Lane()]
        self._replicas: list[Replica] = []
        self._threads: list[threading.Thread] = []
        self._timer = Timer(f"inferkit-{name}-timer")
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self._names = itertools.count()
        self._closing = False
        self._stopped = False
        self._queued = 0
        self._busy = 0
        self._loading = 0  # replacement replicas being loaded
        self._settle_later: list[Request] = []  # settled under the lock, delivered after it
        self._running: dict[str, _Batch] = {}  # by replica name
        # Counters for stats(); see Stats for how they balance.
        self._accepted = 0
        self._completed = 0
        self._cancelled = 0
        self._failed: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._batches = 0
        self._rows = 0
        self._retried = 0
        self._request_seconds = 0.0
        self._compute_seconds = 0.0
        self._sizes: dict[int, int] = {}
        self._reasons: dict[str, int] = {}
        for _ in range(pool.replicas):
            self._add_replica(factory())

    # -- admission -----------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh request id."""
        return next(self._ids)

    def reject(self, error: InferkitError) -> None:
        """Count a request refused before admission (e.g. ``InvalidInput``)."""
        with self._lock:
            kind = type(error).__name__
            self._rejected[kind] = self._rejected.get(kind, 0) + 1

    def put(
        self,
        request: Request,
        *,
        inline: bool = False,
    ) -> tuple[_Batch, Replica] | None:
        """Queue ``request`` (split into parts when it has more rows than a batch).

        Raises ``Closed``, ``Overloaded`` or ``NoHealthyReplica`` without queueing anything.
        With ``inline``, when a replica is idle and a batch should go now, the batch and the
        replica are returned, already claimed, for the caller to :meth:`run_inline`.
        """
        max_rows = self.config.max_batch_size
        if request.rows <= max_rows:
            parts, count = [request], 1
        else:
            count = -(-request.rows // max_rows)
            limit = self.config.max_queue_size
            if count > limit:  # no queue could ever hold it: refuse before any work per part
                too_big = InvalidInput(
                    f"request {request.id} has {request.rows} rows, {count} batches of max_batch_size={max_rows}; "
                    f"max_queue_size={limit} batches is the most one request can take "
                    f"(send at most {max_rows * limit} rows per request)"
                )
                self.reject(too_big)
                raise too_big
            parts = self._split(request, max_rows, count)
        with self._lock:
            error = self._admit(count)
            if error is not None:
                kind = type(error).__name__
                self._rejected[kind] = self._rejected.get(kind, 0) + 1
                raise error
            self._accepted += 1
            now = self._clock()
            inline = inline and count == 1 and self.pool.execution_timeout is None
            if inline and self._balancer is None:
                lane = self._lanes[0]
                if not lane.count and lane.idle and not self._busy:
                    # Nothing queued and every replica idle: skip the queue altogether.
                    self._arrived(lane, now)
                    replica = lane.idle.pop()
                    request.state = _RUNNING
                    batch = _Batch([request], request.rows, "idle")
                    self._start(replica, batch)
                    return batch, replica
            for part in parts:
                lane = self._choose_lane()
                self._push(lane, part, now)
                if part is not parts[-1]:
                    self._wake(lane, part.parts_n)  # parts may run on several replicas at once
            if inline and lane.idle:
                replica = lane.idle[-1]
                formed, _ = self._form(lane, replica, now)
                if formed is not None:
                    lane.idle.pop()
                    self._start(replica, formed)
                    return formed, replica
            self._wake(lane, parts[-1].parts_n)
        if self._settle_later:
            self._flush()
        return None

    def _flush(self) -> None:
        """Deliver results settled under the lock (expired, failed on ejection) to their waiters."""
        with self._lock:
            done, self._settle_later = self._settle_later, []
        _settle_all(done)

    def _admit(self, parts: int) -> InferkitError | None:
        if self._closing:
            return Closed(f"predictor {self.name!r} is closed")
        limit = self.config.max_queue_size
        if self._queued + parts > limit:
            return Overloaded(self._queued, limit)
        for replica in self._replicas:
            if replica.state is ReplicaState.HEALTHY:
                return None
        now = self._clock()
        if not self._loading and not any(r.usable(now) for r in self._replicas):
            return NoHealthyReplica(f"no healthy replica of {self.name!r}")
        return None

    def _split(self, request: Request, max_rows: int, count: int) -> list[Request]:
        """Chunks of ``request``'s ``count`` parts: one per lane at most, each carved as batches form."""
        assert request.inputs is not None
        chunks = min(count, len(self._lanes) if self._balancer is not None else 1)
        parts = []
        first = 0
        for c in range(chunks):
            n = count // chunks + (c < count % chunks)
            start, stop = first * max_rows, min((first + n) * max_rows, request.rows)
            inputs = {k: v[start:stop] for k, v in request.inputs.items()}
            part = Request(
                request.id, inputs, stop - start, request.key, request.priority, request.deadline, request.t0
            )
            part.parent, part.index, part.parts_n, part.part_rows = request, first, n, max_rows
            parts.append(part)
            first += n
        request.parts = parts
        request.parts_left = count
        request.value = [None] * count
        request.inputs = None
        if request.future is not None:
            request.future._on_cancel = lambda: self._cancel_parts(parts)
        return parts

    def _choose_lane(self) -> _Lane:
        if self._balancer is None:
            return self._lanes[0]
        now = self._clock()
        lanes = [ln for ln in self._lanes if any(r.usable(now) for r in ln.replicas)] or self._lanes
        return lanes[self._balancer.choose([ln.load() for ln in lanes])]

    @staticmethod
    def _arrived(lane: _Lane, now: float) -> None:
        """Track the smoothed gap between arrivals, which tells when arrivals went quiet."""
        if lane.last_arrival:
            lane.gap += 0.1 * (now - lane.last_arrival - lane.gap)
        lane.last_arrival = now

    def _push(self, lane: _Lane, request: Request, now: float) -> None:
        if lane.count == 0:
            lane.since = now
        self._arrived(lane, now)
        request.lane = lane
        heapq.heappush(lane.heap, (-request.priority, next(self._seq), request))
        lane.count += request.parts_n
        lane.rows += request.rows
        self._queued += request.parts_n
        if request.future is not None and request.parent is None:
            req = request
            request.future._on_cancel = lambda: self._cancel_parts([req])

    def _wake(self, lane: _Lane, count: int = 1) -> None:
        """Wake ``count`` idle workers of ``lane`` so they can form batches or start their delay timers."""
        for replica in lane.idle[-count:]:
            replica.cond.notify()

    # -- cancellation and deadlines --------------------------------------------------------

    def _cancel_parts(self, parts: Sequence[Request]) -> None:
        with self._lock:
            queued = [p for p in parts if p.state == _QUEUED]
            for part in queued:
                self._unqueue(part)
                part.state = _DONE
            if queued:
                self._cancelled += 1
                if queued[0].parent is not None:
                    queued[0].parent.parts_left = -1  # the parts still running count for nothing
            self._drained.notify_all()

    def _unqueue(self, request: Request) -> None:
        lane = request.lane
        assert lane is not None
        lane.count -= request.parts_n
        lane.rows -= request.rows
        self._queued -= request.parts_n

    def withdraw(self, request: Request) -> bool:
        """Fail ``request`` with ``DeadlineExceeded`` if it (every part of it) is still queued.

        Returns whether it was withdrawn; a request already running is left to finish.
        """
        parts = request.parts or [request]
        with self._lock:
            if request.state != _QUEUED or request.parts_left < 0:  # a split request runs from its first part
                return False
            for part in parts:
                if part.state == _QUEUED:  # another queue's worker may have expired a chunk already
                    self._unqueue(part)
                    part.state = _DONE
            request.state = _DONE
            request.parts_left = -1 if request.parts else 0
            request.error = DeadlineExceeded(f"request {request.id} waited past its deadline")
            self._count_failure(DeadlineExceeded.__name__)
            self._drained.notify_all()
        self._event(RequestsExpired(self.name, (request.id,)))
        return True

    def expire_at(self, request: Request, deadline: float) -> None:
        """Settle a queued ``request`` with ``DeadlineExceeded`` at ``deadline``, promptly."""
        ref = weakref.ref(request)  # the timer must not keep a finished request (and its arrays) alive

        def expire() -> None:
            alive = ref()
            if alive is not None:
                self._expire(alive)

        entry = self._timer.schedule(deadline, expire)
        request.expiry = (self._timer, entry)
        if request.future is not None and request.future.done():  # settled before the line above
            self._timer.cancel(entry)

    def _expire(self, request: Request) -> None:
        if self.withdraw(request):
            request.settle()

    # -- batch formation -------------------------------------------------------------------

    def _form(self, lane: _Lane, replica: Replica, now: float) -> tuple[_Batch | None, float | None]:
        """A batch for ``replica`` if one should go now, else how long to wait (None: until woken).

        Expired and cancelled requests met at the head are settled here, without running.
        """
        if lane.count == 0:
            return None, None
        cfg = self.config
        max_rows = cfg.max_batch_size
        delay = cfg.max_delay_ms / 1000.0
        if lane.rows >= max_rows:
            reason = "full"
        elif now - lane.since >= delay:
            reason = "delay"
        elif not any(r.busy for r in lane.replicas if r is not replica):
            reason = "idle"
        else:
            quiet = min(delay, 4 * lane.gap)
            if now - lane.last_arrival >= quiet:
                reason = "idle"
            else:
                return None, min(lane.since + delay, lane.last_arrival + quiet) - now
        heap = lane.heap
        batch: list[Request] = []
        expired: list[Request] = []
        skipped: list[tuple[int, int, Request]] = []
        rows = 0
        key: Hashable = None
        others: bool | None = None  # whether another replica could take a retry this one failed
        while heap and rows < max_rows:
            req = heap[0][2]
            if req.state != _QUEUED:
                heapq.heappop(heap)
                continue
            if req.deadline is not None and req.deadline <= now:
                heapq.heappop(heap)
                self._unqueue(req)
                req.state = _DONE
                expired.append(req)
                continue
            if req.avoid is replica:
                if others is None:
                    others = any(r is not replica and r.usable(now) for r in lane.replicas)
                if others:
                    skipped.append(heapq.heappop(heap))
                    continue
            if batch and req.key != key:
                if len(skipped) >= _MAX_SKIPPED:  # requests of many shapes must not make each batch cost a scan
                    break
                skipped.append(heapq.heappop(heap))
                continue
            size = req.part_rows if req.parts_n > 1 else req.rows
            if batch and rows + size > max_rows:
                break
            top = req.parent or req
            if top.state == _QUEUED and top.avoid is None:  # its first part to run: the future starts running
                top.state = _RUNNING
                fut = top.future
                if fut is not None and not notify_cancelled(fut):
                    self._drop_cancelled(top)
                    continue
            if req.parts_n > 1:
                req = self._carve(req)
            else:
                heapq.heappop(heap)
                self._unqueue(req)
            req.state = _RUNNING
            key = req.key
            batch.append(req)
            rows += req.rows
        for entry in skipped:
            heapq.heappush(heap, entry)
        if lane.count:
            lane.since = heap[0][2].t0 if heap else now
        if expired:
            self._expired(expired)
        if not batch:
            return None, None
        return _Batch(batch, rows, reason), None

    def _carve(self, chunk: Request) -> Request:
        """Take the next part off a queued chunk of a split request (the chunk stays queued)."""
        assert chunk.inputs is not None
        assert chunk.parent is not None
        n = chunk.part_rows
        part = Request(chunk.id, {k: v[:n] for k, v in chunk.inputs.items()}, n, chunk.key, chunk.priority,
                       chunk.deadline, chunk.t0)  # fmt: skip
        part.parent, part.index = chunk.parent, chunk.index
        chunk.inputs = {k: v[n:] for k, v in chunk.inputs.items()}
        chunk.rows -= n
        chunk.index += 1
        chunk.parts_n -= 1
        lane = chunk.lane
        assert lane is not None
        lane.count -= 1
        lane.rows -= n
        self._queued -= 1
        return part

    def _drop_cancelled(self, top: Request) -> None:
        """Unqueue every queued piece of a request whose future was cancelled before it ran."""
        for piece in top.parts or [top]:
            if piece.state == _QUEUED:
                self._unqueue(piece)
                piece.state = _DONE
        top.state = _DONE
        if top.parts:
            top.parts_left = -1
        self._cancelled += 1
        self._drained.notify_all()

    def _expired(self, requests: list[Request]) -> None:
        """Settle expired requests; called under the lock, settles on the timer thread."""
        outcomes: list[_Outcome] = [
            (r, None, DeadlineExceeded(f"request {r.id} waited past its deadline")) for r in requests
        ]
        self._settle_later.extend(self._tally(outcomes))
        self._event(RequestsExpired(self.name, tuple(r.id for r in requests)))

    def _start(self, replica: Replica, batch: _Batch) -> None:
        replica.busy = True
        replica.running_rows = batch.rows
        self._running[replica.name] = batch
        self._busy += 1

    # -- running batches -------------------------------------------------------------------

    def run_inline(self, batch: _Batch, replica: Replica) -> None:
        """Run a batch returned by :meth:`put` on the caller's thread, then free the replica."""
        result = self._execute(batch, replica)
        with self._lock:
            done = self._finish(batch, replica, result)
            lane = replica.lane
            if lane.count or self._closing or not replica.usable(self._clock()):
                replica.cond.notify()  # its worker takes over: work is queued, or a cooldown to time
            elif replica not in lane.idle:
                lane.idle.append(replica)
        _settle_all(done)
        if self._settle_later:
            self._flush()

    def _execute(self, batch: _Batch, replica: Replica) -> _Result | None:
        """Run ``batch`` on ``replica`` (no lock held); None when the watchdog settled it first."""
        timeout = self.pool.execution_timeout
        start = self._clock()
        watchdog = None
        if timeout is not None:
            watchdog = self._timer.schedule(start + timeout, lambda: self._on_hang(batch, replica))
        outcomes: list[_Outcome] = []
        fault = False
        try:
            _run(batch.requests, replica.backend, outcomes)
        except ReplicaFault as exc:  # the replica is broken: what has not run yet is retried elsewhere
            fault = True
            ran = {id(r) for r, _, _ in outcomes}
            outcomes.extend((r, None, exc) for r in batch.requests if id(r) not in ran)
        end = self._clock()
        if watchdog is not None:
            self._timer.cancel(watchdog)  # it holds the batch, arrays and all
        if not batch.claim.acquire(blocking=False):
            return None
        if self._emit is not None and self._verbose():
            self._event(
                BatchDone(
                    self.name,
                    replica.name,
                    tuple(r.id for r in batch.requests),
                    batch.rows,
                    batch.reason,
                    end - start,
                    tuple(r.id for r, _, e in outcomes if e is not None),
                )
            )
        return outcomes, fault, end, end - start

    def _finish(self, batch: _Batch, replica: Replica, result: _Result | None) -> list[Request]:
        """Count a batch's outcomes and free its replica (under the lock); return what to settle."""
        if result is None:  # the watchdog took over; the replica is gone
            return []
        outcomes, fault, now, spent = result
        final: list[_Outcome] = []
        blamed: list[Replica] = []
        worked = False
        for req, value, failure in outcomes:
            error = failure
            if error is None:
                worked = True
                if req.blame and req.avoid is not None:  # it failed there and worked here: that replica's fault
                    blamed.append(req.avoid)
            elif self._retry(req, replica, error, fault, now):
                continue
            elif fault:
                error = _model_error(req, error)
            final.append((req, value, error))
        done = self._tally(final)
        self._batches += 1
        self._rows += batch.rows
        self._sizes[batch.rows] = self._sizes.get(batch.rows, 0) + 1
        self._reasons[batch.reason] = self._reasons.get(batch.reason, 0) + 1
        replica.batches += 1
        replica.requests += len(batch.requests)
        latencies = [now - r.t0 for r, _, _ in final]
        replica.record_latencies(latencies)
        self._request_seconds += sum(latencies)
        self._compute_seconds += spent
        # A request's own failure says nothing of the replica; only a fault, or a failure that
        # another replica did not repeat, counts against it.
        if fault or worked:
            self._health(replica, ok=not fault, now=now)
        for bad in blamed:  # unless ejected since: what failed before the ejection is no failed probe
            if bad in self._replicas and (bad.state is not ReplicaState.EJECTED or now >= bad.ejected_until):
                self._health(bad, ok=False, now=now)
        self._running.pop(replica.name, None)
        replica.busy = False
        replica.running_rows = 0
        self._busy -= 1
        if self._closing:
            self._drained.notify_all()
        return done

    def _retry(self, req: Request, replica: Replica, error: BaseException, fault: bool, now: float) -> bool:
        """Queue a request that failed on ``replica`` for one try on another replica; whether it was."""
        if req.avoid is not None or self._closing:
            return False
        if not fault and (not isinstance(error, ModelError) or isinstance(error, ExecutionTimeout)):
            return False  # the request's own error (InvalidInput from the backend): no retry
        if self._balancer is None:
            lane = replica.lane
            if not any(r is not replica and r.usable(now) for r in lane.replicas):
                return False
        else:
            lanes = [ln for ln in self._lanes if ln is not replica.lane and any(r.usable(now) for r in ln.replicas)]
            if not lanes:
                return False
            lane = lanes[self._balancer.choose([ln.load() for ln in lanes])]
        req.avoid = replica
        req.blame = not fault  # a fault is counted already
        req.state = _QUEUED
        self._push(lane, req, now)
        self._wake(lane)
        self._retried += 1
        return True

    def _health(self, replica: Replica, *, ok: bool, now: float) -> None:
        """Record a batch's verdict on ``replica``; eject it when that is the verdict's consequence."""
        if record_batch(replica, ok, now, self.pool, self._replicas):
            cooldown = replica.ejected_until - now
            self._event(ReplicaEjected(self.name, replica.name, replica.consecutive_failures, cooldown))
            self._after_ejection(replica)

    def _tally(self, outcomes: list[_Outcome]) -> list[Request]:
        """Count outcomes and assemble split requests; return the top-level requests now done."""
        done = []
        for req, value, error in outcomes:
            req.state = _DONE
            top = req.parent
            if top is None:
                req.value, req.error = value, error
                top = req
            else:
                if top.parts_left < 0:  # cancelled or withdrawn meanwhile
                    continue
                top.value[req.index] = value
                if error is not None and top.error is None:
                    top.error = error
                top.parts_left -= req.parts_n  # a chunk that never ran ends all its parts at once
                if top.parts_left:
                    continue
                top.state = _DONE
                if top.error is None:
                    top.value, top.error = _join(top)
                top.parts_left = -1  # settled from now on
            if top.error is None:
                self._completed += 1
            else:
                self._count_failure(type(top.error).__name__)
            done.append(top)
        if self._closing:
            self._drained.notify_all()
        return done

    def _count_failure(self, kind: str) -> None:
        self._failed[kind] = self._failed.get(kind, 0) + 1

    # -- workers ---------------------------------------------------------------------------

    def _add_replica(self, backend: Backend, lane: _Lane | None = None) -> Replica:
        replica = Replica(f"{self.name}-{next(self._names)}", backend, threading.Condition(self._lock))
        if lane is None:
            if self._balancer is None:
                lane = self._lanes[0]
            else:
                lane = _Lane()
                self._lanes.append(lane)
        replica.lane = lane
        lane.replicas.append(replica)
        self._replicas.append(replica)
        thread = threading.Thread(target=self._work, args=(replica,), name=f"inferkit-{replica.name}", daemon=True)
        replica.thread = thread
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()
        return replica

    def _work(self, replica: Replica) -> None:
        lane: _Lane = replica.lane
        done: list[Request] = []
        self._lock.acquire()
        try:
            while True:
                if done or self._settle_later:
                    done.extend(self._settle_later)
                    self._settle_later = []
                    self._lock.release()
                    _settle_all(done)
                    done = []
                    self._lock.acquire()
                state = replica.state
                if state is ReplicaState.DEAD or (self._stopped and not replica.busy):
                    break
                if replica.busy:  # lent to a caller's thread
                    replica.cond.wait()
                    continue
                now = self._clock()
                if state is ReplicaState.DRAINING:
                    if self._balancer is None or lane.count == 0:
                        break
                    batch, wait = self._form(lane, replica, now)
                elif replica.usable(now):
                    batch, wait = self._form(lane, replica, now)
                else:
                    batch, wait = None, replica.ejected_until - now
                if batch is None:
                    if self._settle_later:  # requests that expired in _form: deliver them before sleeping
                        continue
                    listed = replica.usable(now)
                    if listed and replica not in lane.idle:
                        lane.idle.append(replica)
                    replica.cond.wait(wait)
                    if replica in lane.idle and not replica.busy:
                        lane.idle.remove(replica)
                    continue
                self._start(replica, batch)
                self._lock.release()
                try:
                    result = self._execute(batch, replica)
                finally:
                    self._lock.acquire()
                if result is None:  # the watchdog gave up on this call and replaced the replica
                    break
                done = self._finish(batch, replica, result)
        finally:
            if replica in lane.idle:
                lane.idle.remove(replica)
            if replica.state is not ReplicaState.DEAD or not replica.busy:
                self._retire(replica)
            done.extend(self._settle_later)
            self._settle_later = []
            self._lock.release()
            _settle_all(done)

    def _retire(self, replica: Replica) -> None:
        """Drop a replica whose worker has stopped (under the lock) and free its model."""
        lane: _Lane = replica.lane
        if replica in lane.replicas:
            lane.replicas.remove(replica)
        if replica in self._replicas:
            self._replicas.remove(replica)
        if self._balancer is not None and not lane.replicas and lane in self._lanes and not self._stopped:
            self._lanes.remove(lane)
        with contextlib.suppress(Exception):  # a failing close must not break the worker's cleanup
            replica.backend.close()
        self._drained.notify_all()

    def _after_ejection(self, replica: Replica) -> None:
        """Move a lane's queue elsewhere, or fail it when no replica can serve it."""
        now = self._clock()
        if self._balancer is not None:
            lane = replica.lane
            others = [ln for ln in self._lanes if ln is not lane and any(r.usable(now) for r in ln.replicas)]
            if others:
                self._migrate(lane, others)
                return
        if not any(r.usable(now) for r in self._replicas) and not self._loading:
            self._fail_queued(lambda: NoHealthyReplica(f"no healthy replica of {self.name!r}"))

    def _migrate(self, lane: _Lane, others: list[_Lane]) -> None:
        assert self._balancer is not None
        now = self._clock()
        entries = [e for e in lane.heap if e[2].state == _QUEUED]
        lane.heap.clear()
        for _, _, req in entries:
            self._unqueue(req)
            target = others[self._balancer.choose([ln.load() for ln in others])]
            self._push(target, req, now)
            self._wake(target)

    def _fail_queued(self, make_error: Callable[[], InferkitError]) -> None:
        """Settle every queued request with a fresh error (under the lock; delivered after it)."""
        outcomes: list[_Outcome] = []
        for lane in self._lanes:
            for _, _, req in lane.heap:
                if req.state == _QUEUED:
                    self._unqueue(req)
                    if req.future is not None and req.parent is None:
                        notify_cancelled(req.future)
                    outcomes.append((req, None, make_error()))
            lane.heap.clear()
        self._settle_later.extend(self._tally(outcomes))

    # -- execution timeout -----------------------------------------------------------------

    def _on_hang(self, batch: _Batch, replica: Replica) -> None:
        """The watchdog: the model call outlived ``execution_timeout``; fail it and replace."""
        if not batch.claim.acquire(blocking=False):
            return
        timeout = self.pool.execution_timeout
        outcomes: list[_Outcome] = [
            (r, None, ExecutionTimeout(f"the model call holding request {r.id} ran past {timeout} s"))
            for r in batch.requests
        ]
        with self._lock:
            done = self._tally(outcomes)
            replica.state = ReplicaState.DEAD
            self._running.pop(replica.name, None)
            self._busy -= 1
            lane = replica.lane
            if replica in lane.replicas:
                lane.replicas.remove(replica)
            if replica in self._replicas:
                self._replicas.remove(replica)
            if not self._closing:
                self._loading += 1
                thread = threading.Thread(
                    target=self._replace, args=(replica,), name=f"inferkit-replace-{replica.name}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._drained.notify_all()
        _settle_all(done)
        self._event(ReplicaReplaced(self.name, replica.name, tuple(r.id for r in batch.requests), not self._closing))

    def _replace(self, dead: Replica) -> None:
        try:
            backend: Backend | None = self._factory()
        except Exception:  # noqa: BLE001 (a replacement that cannot load leaves the pool smaller)
            backend = None
        with self._lock:
            self._loading -= 1
            if backend is None:
                self._after_ejection(dead)
            elif self._closing:
                backend.close()
            else:
                self._add_replica(backend, dead.lane if self._balancer is not None else None)
                self._wake(dead.lane)
        self._flush()

    # -- runtime changes -------------------------------------------------------------------

    def reconfigure(self, config: BatchConfig) -> None:
        """Change batching at run time; queued requests are batched under the new settings."""
        with self._lock:
            self.config = config
            for lane in self._lanes:
                self._wake(lane)

    def resize(self, replicas: int) -> None:
        """Grow or shrink the pool; a removed replica finishes what it holds and drains its queue."""
        if replicas < 1:
            msg = f"replicas must be >= 1, got {replicas}"
            raise ValueError(msg)
        with self._lock:
            if self._closing:
                raise Closed(f"predictor {self.name!r} is closed")
            live = [r for r in self._replicas if r.state in LIVE_STATES]
            extra = len(live) - replicas
        if extra < 0:
            backends = [self._factory() for _ in range(-extra)]
            with self._lock:
                for backend in backends:
                    self._add_replica(backend)
                return
        with self._lock:
            # Remove ejected, then idle, then busy replicas (never a busy one before an idle one).
            order = sorted(live, key=lambda r: (r.state is not ReplicaState.EJECTED, r.busy, r.running_rows))
            for replica in order[:extra]:
                replica.state = ReplicaState.DRAINING
                lane = replica.lane
                if self._balancer is not None:
                    now = self._clock()
                    others = [ln for ln in self._lanes if ln is not lane and any(r.usable(now) for r in ln.replicas)]
                    self._migrate(lane, others)
                replica.cond.notify()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let queued and running ones finish, then stop every thread.

        What is still queued when ``timeout`` runs out ends in ``Closed``; a model call that is
        still running gets until the workers are joined (another ``timeout``), then its
        requests end in ``Closed`` too.
        """
        end = None if timeout is None else self._clock() + timeout
        with self._lock:
            self._closing = True
            for lane in self._lanes:
                for replica in lane.idle:
                    replica.cond.notify()
            while self._queued or self._busy:
                left = None if end is None else end - self._clock()
                if left is not None and left <= 0:
                    break
                self._drained.wait(left)
            self._fail_queued(lambda: Closed(f"predictor {self.name!r} closed before the request ran"))
            self._stopped = True
            for replica in list(self._replicas):
                replica.cond.notify_all()
            threads = [r.thread for r in self._replicas if r.thread is not None]
            threads += [t for t in self._threads if t.name.startswith("inferkit-replace")]
        self._flush()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._abandon_running()
        self._timer.close(timeout)

    def _abandon_running(self) -> None:
        """Settle with ``Closed`` what still runs on workers that did not stop in time."""
        with self._lock:
            batches = list(self._running.values())
        for batch in batches:
            if batch.claim.acquire(blocking=False):
                outcomes: list[_Outcome] = [
                    (r, None, Closed(f"predictor {self.name!r} closed while request {r.id} ran"))
                    for r in batch.requests
                ]
                with self._lock:
                    done = self._tally(outcomes)
                _settle_all(done)

    # -- observability ---------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        if self._emit is not None:
            self._emit(event)

    def stats(self, state: str) -> Stats:
        """A consistent snapshot of the counters."""
        with self._lock:
            failed = dict(self._failed)
            done = self._completed + sum(failed.values()) + self._cancelled
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
                for r in self._replicas
            )
            return Stats(
                state=state,
                accepted=self._accepted,
                completed=self._completed,
                failed=failed,
                cancelled=self._cancelled,
                in_flight=self._accepted - done,
                rejected=dict(self._rejected),
                queue_depth=self._queued,
                queued_rows=sum(ln.rows for ln in self._lanes),
                batches=self._batches,
                rows=self._rows,
                request_seconds=self._request_seconds,
                compute_seconds=self._compute_seconds,
                batch_sizes=dict(sorted(self._sizes.items())),
                dispatch_reasons=dict(self._reasons),
                replicas=replicas,
                retried=self._retried,
            )

    def first_backend(self) -> Backend:
        """The first replica's backend (to read the signature and device from)."""
        with self._lock:
            return self._replicas[0].backend

    def healthy(self) -> bool:
        """Whether at least one replica can take work now."""
        now = self._clock()
        with self._lock:
            return any(r.usable(now) for r in self._replicas)


def _settle_all(requests: list[Request]) -> None:
    for request in requests:
        request.settle()


def _run(requests: list[Request], backend: Backend, outcomes: list[_Outcome]) -> None:
    """Run ``requests`` as one batch, bisecting on failure; ``ReplicaFault`` stops it and propagates."""
    try:
        outputs = _call(requests, backend)
    except ReplicaFault:
        raise
    except Exception as exc:  # noqa: BLE001 (any model failure is isolated and typed below)
        if len(requests) == 1:
            error = exc if isinstance(exc, InvalidInput) else _model_error(requests[0], exc)
            outcomes.append((requests[0], None, error))
            return
        mid = len(requests) // 2
        _run(requests[:mid], backend, outcomes)
        _run(requests[mid:], backend, outcomes)
        return
    outcomes.extend(outputs)


def _call(requests: list[Request], backend: Backend) -> list[_Outcome]:
    if len(requests) == 1:
        inputs = requests[0].inputs
        assert inputs is not None
        rows = requests[0].rows
    else:
        names = requests[0].inputs or {}
        inputs = {n: np.concatenate([r.inputs[n] for r in requests]) for n in names}  # type: ignore[index]
        rows = sum(r.rows for r in requests)
    outputs = backend.run(inputs)
    signature = backend.signature
    if signature is not None:
        outputs = signature.check_outputs(outputs)
    arrays = list(outputs.values())
    for name, arr in outputs.items():
        if not isinstance(arr, np.ndarray) or arr.ndim == 0 or arr.shape[0] != rows:
            got = arr.shape if isinstance(arr, np.ndarray) else type(arr).__name__
            msg = f"output {name!r} must have {rows} rows (one per input row), got {got}"
            raise ModelError(msg)
    single = len(arrays) == 1
    if len(requests) == 1:
        return [(requests[0], arrays[0] if single else dict(outputs), None)]
    result: list[_Outcome] = []
    start = 0
    if single:
        arr = arrays[0]
        for r in requests:
            stop = start + r.rows
            result.append((r, arr[start:stop], None))
            start = stop
    else:
        items = list(outputs.items())
        for r in requests:
            stop = start + r.rows
            result.append((r, {k: v[start:stop] for k, v in items}, None))
            start = stop
    return result


def _model_error(request: Request, exc: BaseException) -> ModelError:
    if isinstance(exc, ModelError):
        error = ModelError(f"request {request.id}: {exc}")
    else:
        error = ModelError(f"the model failed on request {request.id}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _join(request: Request) -> tuple[Any, ModelError | None]:
    """The parts' results of a split request joined along the batch, or why they cannot be."""
    values = request.value
    try:
        if isinstance(values[0], np.ndarray):
            return np.concatenate(values), None
        return {k: np.concatenate([v[k] for v in values]) for k in values[0]}, None
    except Exception as exc:  # noqa: BLE001 (a model whose output shape depends on the batch)
        error = ModelError(
            f"request {request.id} was split into {len(values)} batches and their outputs cannot be joined "
            f"({type(exc).__name__}: {exc}); the model's output shape depends on the batch, so send at most "
            "max_batch_size rows per request"
        )
        error.__cause__ = exc
        return None, error
