"""What ``stats()`` reports, counted in one place (under the batcher's lock)."""

from __future__ import annotations

from collections import defaultdict

from inferkit.stats import ReplicaStats, Stats

__all__ = ["Counters"]


class Counters:
    """Request outcomes and batch figures; ``accepted == completed + failed + cancelled + in flight``."""

    def __init__(self) -> None:
        self.accepted = 0
        self.completed = 0
        self.cancelled = 0
        self.failed: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.retried = 0
        self.batches = 0
        self.rows = 0
        self.request_seconds = 0.0
        self.compute_seconds = 0.0
        # defaultdicts: ``+= 1`` on a new key makes no Python call (see ``CallerThread._run_alone``)
        self.sizes: defaultdict[int, int] = defaultdict(int)
        self.reasons: defaultdict[str, int] = defaultdict(int)

    def reject(self, error: BaseException) -> None:
        """A request refused at the door (never accepted)."""
        kind = type(error).__name__
        self.rejected[kind] = self.rejected.get(kind, 0) + 1

    def ended(self, error: BaseException | None) -> None:
        """An accepted request settled with a result or ``error``."""
        if error is None:
            self.completed += 1
        else:
            kind = type(error).__name__
            self.failed[kind] = self.failed.get(kind, 0) + 1

    def batch(self, rows: int, reason: str, request_seconds: float, spent: float) -> None:
        """A model call of ``rows`` rows that took ``spent`` seconds; the latencies of the requests it ended, summed."""
        self.batches += 1
        self.rows += rows
        self.sizes[rows] += 1
        self.reasons[reason] += 1
        self.request_seconds += request_seconds
        self.compute_seconds += spent

    def snapshot(
        self, state: str, queue_depth: int, queued_rows: int, replicas: tuple[ReplicaStats, ...], loading: int
    ) -> Stats:
        """A :class:`Stats` of the counters as they are."""
        done = self.completed + sum(self.failed.values()) + self.cancelled
        return Stats(
            state=state,
            accepted=self.accepted,
            completed=self.completed,
            failed=dict(self.failed),
            cancelled=self.cancelled,
            in_flight=self.accepted - done,
            rejected=dict(self.rejected),
            queue_depth=queue_depth,
            queued_rows=queued_rows,
            batches=self.batches,
            rows=self.rows,
            request_seconds=self.request_seconds,
            compute_seconds=self.compute_seconds,
            batch_sizes=dict(sorted(self.sizes.items())),
            dispatch_reasons=dict(self.reasons),
            replicas=replicas,
            retried=self.retried,
            loading=loading,
        )
