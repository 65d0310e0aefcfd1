"""Replicas of a backend: balancing policies, health, ejection and probing back.

The pool is passive: it owns the replicas and decides which may take work; the batcher's
workers drive it. Ejection follows Envoy's outlier detection: ``eject_after`` consecutive
failures of a replica eject it for ``cooldown`` seconds, doubled on each repeat up to
``max_cooldown``; then one batch probes it back. Only faults of the replica count: a
:class:`~inferkit.ReplicaFault` from its backend, or a request that failed on it and then
succeeded on another replica. A request that fails wherever it runs is that request's error.
At most ``max_ejected_fraction`` of the replicas are ejected at once (at least one may be),
and, like Envoy's healthy panic threshold, never the last healthy one: a model is never
taken out of service for failures.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np

from inferkit._validators import fraction, integer, number, optional_positive
from inferkit.backends.base import Backend

__all__ = [
    "Balancer",
    "LeastOutstanding",
    "PoolConfig",
    "PowerOfTwoChoices",
    "Replica",
    "ReplicaState",
    "RoundRobin",
]


@runtime_checkable
class Balancer(Protocol):
    """**Protocol**: picks which replica's own queue takes the next request."""

    def choose(self, loads: Sequence[int]) -> int:
        """Return an index into ``loads``: rows queued or running on each eligible replica."""


class RoundRobin:
    """Each replica in turn, whatever its load."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Sequence[int]) -> int:
        """The replica after the last one chosen."""
        choice = self._next % len(loads)
        self._next = choice + 1
        return choice


class LeastOutstanding:
    """The replica with the fewest rows queued and running."""

    def choose(self, loads: Sequence[int]) -> int:
        """The least loaded replica (the first on ties)."""
        return min(range(len(loads)), key=loads.__getitem__)


class PowerOfTwoChoices:
    """The less loaded of two replicas picked at random (Mitzenmacher's power of two choices)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, loads: Sequence[int]) -> int:
        """The less loaded of two random replicas."""
        if len(loads) == 1:
            return 0
        a, b = self._rng.sample(range(len(loads)), 2)
        return a if loads[a] <= loads[b] else b


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwoChoices,
}


def _balancing(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value != "shared" and value not in BALANCERS and not isinstance(value, Balancer):
        msg = f"{attribute.name} must be 'shared', one of {sorted(BALANCERS)} or a Balancer, got {value!r}"
        raise ValueError(msg)


@attrs.frozen
class PoolConfig:
    """How many replicas, how requests reach them, and when a replica is taken out.

    =========================  ==============================================================
    ``replicas``               model instances, each with its own worker thread (>= 1)
    ``balancing``              ``"shared"``: one queue that free replicas pull from (default,
                               fastest in-process); or ``"round_robin"``,
                               ``"least_outstanding"``, ``"power_of_two"`` or a
                               :class:`Balancer`: a queue per replica, chosen per request
    ``execution_timeout``      seconds a model call may take before its replica is replaced
                               and its requests fail with ``ExecutionTimeout`` (None: no limit)
    ``eject_after``            consecutive faults of a replica that eject it (its own
                               faults only, never a request's: see the module docstring)
    ``cooldown``               seconds of the first ejection, doubled on each repeat
    ``max_cooldown``           the longest ejection
    ``max_ejected_fraction``   share of replicas that may be ejected at once (at least one)
    =========================  ==============================================================
    """

    replicas: int = attrs.field(default=1, validator=integer(1))
    balancing: str | Balancer = attrs.field(default="shared", validator=_balancing)
    execution_timeout: float | None = attrs.field(default=None, validator=optional_positive)
    eject_after: int = attrs.field(default=5, validator=integer(1))
    cooldown: float = attrs.field(default=5.0, validator=number(0, inclusive=False))
    max_cooldown: float = attrs.field(default=60.0, validator=number(0, inclusive=False))
    max_ejected_fraction: float = attrs.field(default=0.5, validator=fraction)

    def balancer(self) -> Balancer | None:
        """A fresh balancer, or ``None`` for the shared queue."""
        if isinstance(self.balancing, str):
            if self.balancing == "shared":
                return None
            balancer: Balancer = BALANCERS[self.balancing]()
            return balancer
        return self.balancing


class ReplicaState(enum.Enum):
    """Where a replica is in its life."""

    HEALTHY = "healthy"  # takes work
    EJECTED = "ejected"  # faulted repeatedly; takes work again (one probe batch) after its cooldown
    DRAINING = "draining"  # removed by resize: finishes what it holds, takes nothing new
    DEAD = "dead"  # hung past execution_timeout or closed; its thread is abandoned or gone


LIVE_STATES = frozenset({ReplicaState.HEALTHY, ReplicaState.EJECTED})  # draining and dead ones are leaving

LATENCY_WINDOW = 2048  # recent request latencies kept per replica for percentiles

MAX_REPLICAS = 256
"""The most replicas a server builds for one model, from a config file, a load or the command line:
each builds and warms a session, and loads take turns, so more is a typo, not a pool."""


@attrs.define(eq=False)
class Replica:
    """One backend instance and its health. Mutated only under the batcher's lock."""

    name: str
    backend: Backend
    cond: threading.Condition
    state: ReplicaState = ReplicaState.HEALTHY
    busy: bool = False  # running a batch, on its worker or a caller's thread
    cpu_threads: int = 0  # cores a batch keeps busy (see inferkit.backends.base.cpu_threads)
    running_rows: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    latencies: list[float] = attrs.field(factory=lambda: [0.0] * LATENCY_WINDOW)
    latency_count: int = 0
    thread: threading.Thread | None = None
    lane: Any = None  # the batcher's queue this replica serves

    def usable(self, now: float) -> bool:
        """Whether the replica may take a batch now (an ejected one after its cooldown: a probe)."""
        if self.state is ReplicaState.HEALTHY:
            return True
        return self.state is ReplicaState.EJECTED and now >= self.ejected_until

    def record_latencies(self, values: list[float]) -> None:
        """Keep the most recent request latencies, in seconds, in a ring buffer."""
        ring = self.latencies
        n = self.latency_count
        for value in values:
            ring[n % LATENCY_WINDOW] = value
            n += 1
        self.latency_count = n

    def percentiles(self) -> tuple[float, float, float]:
        """p50, p95 and p99 of the recent request latencies in milliseconds (0 when none)."""
        n = min(self.latency_count, LATENCY_WINDOW)
        if n == 0:
            return (0.0, 0.0, 0.0)
        p = np.percentile(self.latencies[:n], [50, 95, 99]) * 1000.0
        return (float(p[0]), float(p[1]), float(p[2]))


def may_eject(replicas: Sequence[Replica], fraction: float) -> bool:
    """Whether one more healthy replica may be ejected: one stays healthy, and ``fraction`` holds.

    At least one replica may always be ejected when another stays healthy, whatever ``fraction``.
    """
    live = [r for r in replicas if r.state in LIVE_STATES]
    ejected = sum(r.state is ReplicaState.EJECTED for r in live)
    if len(live) - ejected < 2:  # the panic threshold: never eject the last healthy replica
        return False
    return ejected == 0 or ejected + 1 <= fraction * len(live)


def record_batch(replica: Replica, ok: bool, now: float, config: PoolConfig, replicas: Sequence[Replica]) -> bool:
    """Update a replica's health with a verdict (ok, or a fault of its own); return True when this ejects it."""
    if ok:
        replica.consecutive_failures = 0
        replica.state = ReplicaState.HEALTHY if replica.state is ReplicaState.EJECTED else replica.state
        return False
    replica.failed_batches += 1
    replica.consecutive_failures += 1
    if replica.state not in LIVE_STATES:
        return False
    probing = replica.state is ReplicaState.EJECTED
    if replica.state is ReplicaState.HEALTHY and replica.consecutive_failures < config.eject_after:
        return False
    if not probing and not may_eject(replicas, config.max_ejected_fraction):
        return False
    replica.ejections += 1
    replica.state = ReplicaState.EJECTED
    cooldown = min(config.cooldown * 2 ** (replica.ejections - 1), config.max_cooldown)
    replica.ejected_until = now + cooldown
    return True
