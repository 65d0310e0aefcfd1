"""Snapshots of what a predictor has done, returned by ``stats()``."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["ReplicaStats", "Stats"]


@attrs.frozen
class ReplicaStats:
    """One replica: its state, the work it did and the latency of the requests it served (ms)."""

    name: str
    state: str
    device: str
    batches: int
    requests: int
    failed_batches: int
    ejections: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


@attrs.frozen
class Stats:
    """A consistent snapshot of a predictor's counters.

    The counters balance: ``accepted == completed + sum(failed.values()) + cancelled +
    in_flight``. ``rejected`` counts requests refused at the door (``InvalidInput``,
    ``Overloaded``, ``Closed``, ``NoHealthyReplica``, ``DeadlineExceeded`` for a ``timeout <= 0``),
    which were never accepted.
    ``batch_sizes`` maps rows per batch to how many batches had that many;
    ``dispatch_reasons`` says why each batch went: ``"full"`` (``max_batch_size`` reached),
    ``"delay"`` (``max_delay_ms`` ran out) or ``"idle"`` (a replica was free and waiting would
    not have grown the batch). ``request_seconds`` adds up the time from arrival to result of
    every request that ran, ``compute_seconds`` the time of every model call. ``retried``
    counts requests that failed on one replica and were tried once more on another.
    ``loading`` counts replicas being loaded (to replace one that hung, or added by ``resize``):
    they join ``replicas`` once loaded (``resize`` and an autoscaler count them already).
    """

    state: str
    accepted: int
    completed: int
    failed: Mapping[str, int]
    cancelled: int
    in_flight: int
    rejected: Mapping[str, int]
    queue_depth: int
    queued_rows: int
    batches: int
    rows: int
    request_seconds: float
    compute_seconds: float
    batch_sizes: Mapping[int, int]
    dispatch_reasons: Mapping[str, int]
    replicas: tuple[ReplicaStats, ...]
    retried: int = 0
    loading: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Average rows per batch (0 before the first batch)."""
        return self.rows / self.batches if self.batches else 0.0
