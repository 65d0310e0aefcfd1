"""The replicas of a batcher and the lanes they serve: who exists, who can take work, where a request goes.

Also what a queued request is keyed by (``key``): only requests of equal keys share a batch.

Plain bookkeeping under the batcher's lock; the batcher drives replicas' lives (start, drain,
eject, replace) and this keeps the lists consistent.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Hashable

from inferkit.backends.base import Backend, BackendFactory, cpu_threads, usable_cores
from inferkit.batching.lane import Lane
from inferkit.batching.request import Inputs
from inferkit.pool import LIVE_STATES, Balancer, Replica, ReplicaState

__all__ = ["ReplicaSet"]


class ReplicaSet:
    """Replicas, their lanes (one shared, or one each with a balancer) and their threads."""

    def __init__(self, name: str, factory: BackendFactory, balancer: Balancer | None, lock: threading.Lock) -> None:
        self.name = name
        self.factory = factory  # loads a new replica's backend (at start, on resize, to replace a hung one)
        self.balancer = balancer
        self.lanes: list[Lane] = [] if balancer is not None else [Lane()]
        self.all: list[Replica] = []
        self.threads: list[threading.Thread] = []  # workers and replacement loaders
        self.loading = 0  # replicas being loaded (replacements, and those a resize adds)
        self.target = 0  # the replicas asked for (the constructor's, then the last resize's)
        self.cores = max(1, usable_cores() - 1)  # what replicas may keep busy: one core is the callers'
        self.key: Callable[[Inputs], Hashable] | None = None  # a queued request's batch key (None: any batch)
        self._lock = lock
        self._names = itertools.count()

    def add(self, backend: Backend, work: Callable[[Replica], None], lane: Lane | None = None) -> Replica:
        """A new replica of ``backend`` with its worker thread running ``work``."""
        replica = Replica(f"{self.name}-{next(self._names)}", backend, threading.Condition(self._lock))
        replica.cpu_threads = cpu_threads(backend)
        if lane is None:
            if self.balancer is None:
                lane = self.lanes[0]
            else:
                lane = Lane()
                self.lanes.append(lane)
        replica.lane = lane
        lane.replicas.append(replica)
        self.all.append(replica)
        thread = threading.Thread(target=work, args=(replica,), name=f"inferkit-{replica.name}", daemon=True)
        replica.thread = thread
        self.start(thread)
        return replica

    def start(self, thread: threading.Thread) -> None:
        """Start a thread of this set, so that close() can join it."""
        self.threads = [t for t in self.threads if t.is_alive()]
        self.threads.append(thread)
        thread.start()

    def remove(self, replica: Replica, *, keep_lane: bool) -> None:
        """Take a replica out; its own lane goes too (with a balancer) unless ``keep_lane``."""
        lane: Lane = replica.lane
        if replica in lane.replicas:
            lane.replicas.remove(replica)
        if replica in self.all:
            self.all.remove(replica)
        if self.balancer is not None and not lane.replicas and lane in self.lanes and not keep_lane:
            self.lanes.remove(lane)

    def live(self) -> list[Replica]:
        """Replicas that are healthy or ejected (not draining, not dead)."""
        return [r for r in self.all if r.state in LIVE_STATES]

    def usable(self, now: float) -> bool:
        """Whether any replica can take a batch now."""
        return any(r.usable(now) for r in self.all)

    def can_serve(self, now: float) -> bool:
        """Whether a new request may be admitted: a replica can take it now or soon."""
        for replica in self.all:
            if replica.state is ReplicaState.HEALTHY:
                return True
        if self.balancer is not None and not self.lanes:  # nowhere to queue until a replica joins
            return False
        return bool(self.loading) or self.usable(now)

    def other_lanes(self, lane: Lane, now: float) -> list[Lane]:
        """Lanes besides ``lane`` with a replica that can take work now."""
        return [ln for ln in self.lanes if ln is not lane and any(r.usable(now) for r in ln.replicas)]

    def choose(self, lanes: list[Lane]) -> Lane:
        """The balancer's pick among ``lanes``; the least loaded if a (user's) balancer raises or misses."""
        assert self.balancer is not None
        if len(lanes) == 1:  # nothing to choose (often: the one busy queue while the cores are crowded)
            return lanes[0]
        loads = [ln.load() for ln in lanes]
        try:
            pick = self.balancer.choose(loads)
            if type(pick) is int and 0 <= pick < len(lanes):
                return lanes[pick]
        except Exception:  # noqa: BLE001, S110 (a pluggable part must never break serving)
            pass
        return lanes[loads.index(min(loads))]

    def lane_for(self, now: float, full: int) -> Lane:
        """Where a new request goes: the shared lane, or the balancer's pick of the usable ones.

        The pick is among the lanes that would not crowd the cores (see :meth:`crowded`): while a
        CPU replica is busy, an idle one beside it would take the callers' core, so the request
        goes to a busy replica's queue, which it takes next, unless that queue holds ``full``
        rows already (the model is then the bound, and every replica should run).
        """
        if self.balancer is None:
            return self.lanes[0]
        busy = 0
        for r in self.all:
            if r.busy or self._next(r):
                busy += r.cpu_threads
        return self.choose(self._fitting(now, busy, full, usable=True) or self._fitting(now, busy, full, usable=False))

    def _fitting(self, now: float, busy: int, full: int, *, usable: bool) -> list[Lane]:
        """The lanes :meth:`lane_for` picks among, of the usable ones (or of all).

        Those that would not crowd ``busy`` busy cores, else those short of ``full`` rows, else
        every one. One pass with plain loops: it runs for every request.
        """
        every: list[Lane] = []
        short: list[Lane] = []
        calm: list[Lane] = []
        for lane in self.lanes:
            if usable:
                for r in lane.replicas:
                    if r.state is ReplicaState.HEALTHY or r.usable(now):
                        break
                else:
                    continue
            every.append(lane)
            if busy and lane.rows < full:
                short.append(lane)
                if not self._crowds(lane, busy):
                    calm.append(lane)
        return calm or short or every

    def _crowds(self, lane: Lane, busy: int) -> bool:
        """Whether starting ``lane``'s idle replica beside ``busy`` busy cores would take the callers' core."""
        need = 0
        for r in lane.replicas:
            if r.busy or self._next(r):
                return False
            need = max(need, r.cpu_threads)
        return need > 0 and busy + need > self.cores

    @staticmethod
    def _next(replica: Replica) -> bool:
        """Whether a healthy replica's queue holds work: it runs next, so its cores count as taken.

        Not a probing one (ejected, cooled off): arrivals must not pile up behind a replica that
        may fail again.
        """
        return replica.lane.count > 0 and replica.state is ReplicaState.HEALTHY

    def crowded(self, replica: Replica) -> bool:
        """Whether a batch on ``replica`` now, beside the busy replicas, would take the callers' core.

        Then only a full batch or one whose delay ran out goes: a small batch started on a
        crowded machine slows the busy replicas and the callers more than it gains. Only on the
        shared queue, where the busy replica takes the waiting batch when it is free; with a
        queue per replica, :meth:`lane_for` keeps requests off such a replica instead.
        """
        need = replica.cpu_threads
        if not need or self.balancer is not None:
            return False
        busy = self._busy_cores(replica)
        return busy > 0 and busy + need > self.cores

    def _busy_cores(self, other_than: Replica | None = None) -> int:
        """Cores the busy replicas (but ``other_than``) keep busy; a loop: it runs per request."""
        busy = 0
        for r in self.all:
            if r.busy and r is not other_than:
                busy += r.cpu_threads
        return busy

    def queued(self) -> tuple[int, int]:
        """Parts queued in every lane, and the bytes of their inputs."""
        parts = held = 0
        for ln in self.lanes:  # a loop: this runs for every request
            parts += ln.count
            held += ln.bytes
        return parts, held
