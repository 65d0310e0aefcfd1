"""A lane: a priority queue of requests, and the rule that forms a batch from it.

The lane owns no lock and counts nothing for ``stats()``: the batcher calls it under its lock
and does the counting. With the shared queue there is one lane for every replica; with a
balancer, one per replica.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING

from inferkit.batching.assembly import carve
from inferkit.batching.request import DONE, QUEUED, RUNNING, Request, notify_cancelled

if TYPE_CHECKING:
    from inferkit.batching.config import BatchConfig
    from inferkit.pool import Replica

__all__ = ["Batch", "Formed", "Lane"]

_MAX_SKIPPED = 64  # queued requests of other shapes looked past while filling one batch


class Batch:
    """Requests that run together in one model call."""

    __slots__ = ("claim", "plain", "reason", "requests", "rows")

    def __init__(self, requests: list[Request], rows: int, reason: str, *, plain: bool = False) -> None:
        self.requests = requests
        self.rows = rows
        self.reason = reason
        # Every request whole, on its first try, without a future; once run, none failed (cleared
        # when one did): the batch's end then needs no retry, blame or assembly (``Batcher._account``).
        self.plain = plain
        # Exactly one of the worker and the execution-timeout watchdog settles the batch.
        self.claim = threading.Lock()


class Formed:
    """What :meth:`Lane.form` found: a batch or how long to wait, and what it cleared off the queue."""

    __slots__ = ("batch", "cancelled", "expired", "wait")

    def __init__(self) -> None:
        self.batch: Batch | None = None
        self.wait: float | None = None  # with no batch: seconds until one may be due (None: until woken)
        self.expired: list[Request] = []  # queued past their deadline, now off the queue
        self.cancelled: list[Request] = []  # requests whose caller cancelled them, now off the queue


class Lane:
    """A priority queue (highest first, then oldest) served by one or more replicas."""

    __slots__ = (
        "bytes",
        "count",
        "gap",
        "heap",
        "idle",
        "last_arrival",
        "last_rows",
        "replicas",
        "rows",
        "seq",
        "since",
    )

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, Request]] = []
        self.seq = itertools.count()
        self.count = 0  # queued parts (the heap may hold settled entries, skipped lazily)
        self.rows = 0
        self.bytes = 0  # of the queued inputs
        self.since = 0.0  # arrival of the oldest queued request (FIFO head)
        self.last_arrival = 0.0
        self.gap = 0.0  # smoothed time between arrivals
        self.last_rows = 0  # rows of the last batch formed here
        self.replicas: list[Replica] = []
        self.idle: list[Replica] = []  # replicas whose worker waits for work

    def load(self) -> int:
        """Rows queued here and running on its replicas (what a balancer compares)."""
        return self.rows + sum(r.running_rows for r in self.replicas)

    def arrived(self, now: float) -> None:
        """Track the smoothed gap between arrivals, which tells when arrivals went quiet."""
        if self.last_arrival:
            self.gap += 0.1 * (now - self.last_arrival - self.gap)
        self.last_arrival = now

    def push(self, request: Request, now: float) -> None:
        """Queue a request (or a chunk of parts)."""
        if self.count == 0:
            self.since = now
        self.arrived(now)
        request.lane = self
        # What ``form`` need not check: none of these can change while it is queued.
        request.plain = (
            request.deadline is None and request.avoid is None and request.parent is None and request.future is None
        )
        heapq.heappush(self.heap, (-request.priority, next(self.seq), request))
        self.count += request.parts_n
        self.rows += request.rows
        self.bytes += request.nbytes

    def unqueue(self, request: Request) -> None:
        """Uncount a queued request; its heap entry is skipped when it reaches the head."""
        self.count -= request.parts_n
        self.rows -= request.rows
        self.bytes -= request.nbytes

    def wake(self, count: int = 1) -> None:
        """Wake ``count`` idle workers so they can form batches or start their delay timers.

        A woken worker leaves the idle ones at once: the next wake-up, before it runs, goes to
        another (two arrivals wake two workers, not one twice).
        """
        idle = self.idle
        for _ in range(min(count, len(idle))):
            idle.pop().cond.notify()

    def usable_besides(self, replica: Replica, now: float) -> bool:
        """Whether another replica of this lane can take work now."""
        return any(r is not replica and r.usable(now) for r in self.replicas)

    def form(self, replica: Replica, now: float, config: BatchConfig, *, crowded: bool = False) -> Formed:
        """A batch for ``replica`` if one should go now, else how long to wait.

        A batch gathers requests up to ``config.full_rows`` rows (its first request or part may hold
        more, up to ``config.call_rows``, as it was split). It goes when full (that many queued),
        when its oldest request waited ``max_delay_ms``, or when waiting
        cannot grow it (no other replica of the lane is busy, or arrivals went quiet) unless the
        cores are ``crowded`` (see :meth:`ReplicaSet.crowded`). On a replica that computes on the
        CPU, a batch that goes because waiting cannot grow it takes at most the mean of the rows
        queued and the last batch's rows, so that consecutive batches stay even. Expired and
        cancelled requests met on the way are taken off the queue and reported.
        """
        formed = Formed()
        if self.count == 0:
            return formed
        max_rows = config.full_rows
        delay = config.max_delay_ms / 1000.0
        if self.rows >= max_rows:
            reason = "full"
        elif now - self.since >= delay:
            reason = "delay"
        elif crowded:
            formed.wait = self.since + delay - now
            return formed
        elif not any(r.busy for r in self.replicas if r is not replica):
            reason = "idle"
        else:
            quiet = min(delay, 4 * self.gap)
            if now - self.last_arrival < quiet:
                formed.wait = min(self.since + delay, self.last_arrival + quiet) - now
                return formed
            reason = "idle"
        if reason == "idle" and replica.cpu_threads and 0 < self.last_rows < self.rows:
            # Even batches: the callers of one come back while the next computes (docs/batching.md).
            max_rows = min(max_rows, (self.rows + self.last_rows + 1) // 2)
        heap = self.heap
        pop = heapq.heappop
        batch: list[Request] = []
        skipped: list[tuple[int, int, Request]] = []
        rows = taken = 0
        key: Hashable = None
        plain = True
        others: bool | None = None  # whether another replica could take a retry this one failed
        while heap and rows < max_rows:
            req = heap[0][2]
            if req.plain and req.state is QUEUED and (not batch or req.key == key):  # the common case, checked less
                if batch and rows + req.rows > max_rows:
                    break
                pop(heap)
            else:
                if req.state is not QUEUED:
                    pop(heap)
                    continue
                if req.deadline is not None and req.deadline <= now and unstarted(req.parent or req):
                    pop(heap)
                    self.unqueue(req)
                    req.state = DONE
                    formed.expired.append(req)
                    continue
                if req.avoid is replica:
                    if others is None:
                        others = self.usable_besides(replica, now)
                    if others:
                        skipped.append(pop(heap))
                        continue
                if batch and req.key != key:
                    if len(skipped) >= _MAX_SKIPPED:  # requests of many shapes must not make each batch cost a scan
                        break
                    skipped.append(pop(heap))
                    continue
                size = req.part_rows if req.parts_n > 1 else req.rows
                if batch and rows + size > max_rows:
                    break
                top = req.parent or req
                if unstarted(top):  # its first part to run: the future starts running
                    if top.future is not None and not notify_cancelled(top.future):
                        drop(top)
                        formed.cancelled.append(top)
                        continue
                    top.state = RUNNING
                if req.parts_n > 1:  # the rest of its parts go behind what is queued: a big request takes turns
                    heapq.heapreplace(heap, (-req.priority, next(self.seq), req))
                    req = carve(req)
                else:
                    pop(heap)
                plain = False
            req.state = RUNNING
            key = req.key
            batch.append(req)
            rows += req.rows
            taken += req.nbytes
        for entry in skipped:
            heapq.heappush(heap, entry)
        self.count -= len(batch)  # what the batch took off the queue (``unqueue``), counted once
        self.rows -= rows
        self.bytes -= taken
        if self.count:
            self.since = heap[0][2].t0 if heap else now
        if batch:
            self.last_rows = rows
            formed.batch = Batch(batch, rows, reason, plain=plain)
        return formed


def unstarted(top: Request) -> bool:
    """Whether none of ``top`` has run: a deadline fails only such a request (no part run, no retry)."""
    return top.state is QUEUED and top.avoid is None


def drop(top: Request) -> bool:
    """Take every queued piece of ``top`` off its queue and settle nothing; whether any was queued."""
    found = False
    for piece in top.split.chunks if top.split is not None else (top,):
        if piece.state is QUEUED:
            assert piece.lane is not None
            piece.lane.unqueue(piece)
            piece.state = DONE
            found = True
    top.state = DONE
    if top.split is not None:
        top.split.open = False
    return found
